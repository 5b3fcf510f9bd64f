"""A model's weights on disk: the original `.npz` layout (`checkpoint`), the public files by name
(`registry`), transformers directories (`convert`), and what a file's head scores and calls its
classes (`head_record`, `labels`)."""
