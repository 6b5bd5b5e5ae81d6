"""One module per dataset source; the machinery they share (cache, splits, parsing, text) is one level up."""
