"""`loupe bench embed-texts`: distinct lines embedded by the real packaged MiniLM, written whole, read by `bench index`."""

import numpy as np
from typer.testing import CliRunner

from loupe.jobs.bench.index import EmbeddingFile
from loupe.jobs.cli import app

LINES = [
    "A dog runs across the park after a ball.",
    "Stock prices fell sharply on Monday morning.",
    "",
    "A puppy is chasing a ball through the park.",
    "A dog runs across the park after a ball.",  # a repeat: one row
    "The committee will vote on the budget next week.",
]


def test_distinct_lines_become_unit_vectors_in_order(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n".join(LINES[:3]) + "\n")
    second.write_text("\n".join(LINES[3:]) + "\n")
    out = tmp_path / "texts.npy"
    result = CliRunner().invoke(app, ["bench", "embed-texts", str(first), str(second), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 texts embedded in 384 dimensions" in result.output
    vectors = np.load(out)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    dog, stocks, puppy, vote = vectors
    assert dog @ puppy > 0.5 > max(dog @ stocks, dog @ vote)  # a real model: the paraphrase is nearest
    assert not list(tmp_path.glob(".*partial"))
    # The file is what `loupe bench index --embeddings` reads.
    data = EmbeddingFile(out, queries=1)
    assert (data.n, data.dim) == (3, 384) and sum(len(batch) for batch in data()) == 3


def test_a_missing_or_empty_text_file_is_one_line(tmp_path):
    out = tmp_path / "texts.npy"
    for args, said in (([str(tmp_path / "absent.txt")], "cannot read"), ([str(tmp_path / "blank.txt")], "no non-empty line")):
        (tmp_path / "blank.txt").write_text("\n  \n")
        result = CliRunner().invoke(app, ["bench", "embed-texts", *args, "--out", str(out)])
        assert result.exit_code == 2 and said in result.output, result.output
        assert "Traceback" not in result.output
    assert not out.exists()
