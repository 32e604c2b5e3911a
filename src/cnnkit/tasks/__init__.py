"""One module per task: its model, loss, metrics, decoding and drawing."""
