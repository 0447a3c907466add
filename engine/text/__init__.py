"""Text: the tokenizer and chat templates, incremental detokenization, stop-string
matching, reasoning formats, and the per-request pipeline that turns tokens into text."""
