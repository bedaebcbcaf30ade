// The API page: /openapi.json rendered as text (FastAPI's own pages load their script from a CDN).
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text != null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function typeOf(schema, spec) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.anyOf) return schema.anyOf.map((s) => typeOf(s, spec)).join(" | ");
  if (schema.type === "array") return `${typeOf(schema.items, spec)}[]`;
  return schema.format ? `${schema.type} (${schema.format})` : schema.type || "object";
}

function table(header, rows) {
  const t = el("table");
  const head = el("tr");
  header.forEach((h) => head.append(el("th", h)));
  t.append(head);
  for (const row of rows) {
    const tr = el("tr");
    row.forEach((cell) => tr.append(el("td", cell)));
    t.append(tr);
  }
  return t;
}

async function start() {
  const spec = await (await fetch("/openapi.json", { credentials: "same-origin" })).json();
  document.getElementById("title").textContent = `${spec.info.title} ${spec.info.version}`;
  document.getElementById("summary").textContent = spec.info.description || spec.info.summary || "";
  const list = document.getElementById("endpoints");
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const box = el("section", null, "endpoint");
      const title = el("h3");
      title.append(el("span", method.toUpperCase(), "method"), el("code", path));
      box.append(title, el("p", op.description || op.summary || ""));
      const params = (op.parameters || []).map((p) => [
        p.name, p.in, typeOf(p.schema, spec) + (p.required ? ", required" : ""),
        (p.description || "") + (p.schema && p.schema.default !== undefined ? ` (default ${JSON.stringify(p.schema.default)})` : ""),
      ]);
      const body = op.requestBody && op.requestBody.content;
      if (body) {
        for (const [type, content] of Object.entries(body)) params.push(["body", type, typeOf(content.schema, spec), "request body"]);
      }
      if (params.length) box.append(table(["parameter", "in", "type", "meaning"], params));
      const responses = Object.entries(op.responses || {}).map(([code, r]) => [
        code, r.description || "", Object.keys(r.content || {}).join(", "),
      ]);
      box.append(table(["status", "meaning", "content"], responses));
      list.append(box);
    }
  }
}

start().catch((error) => {
  document.getElementById("summary").textContent = `cannot read /openapi.json: ${error.message}`;
});
