"""Model stages loaded once and called on batches: captioner, moderator, embedders, and their loading."""
