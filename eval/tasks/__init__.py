"""One module per task; each takes an encoder and a loaded dataset and returns a :class:`eval.report.TaskResult`."""
