"""Where a run's time goes: spans of every process (spans), their merge into one Chrome /
Perfetto trace on one clock (merge), the learner's scalars for TensorBoard / W&B (scalars),
and the `dynamo-rl profile` report and figures (report, figures)."""
