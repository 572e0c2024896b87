"""The product path: a folder of scans through a predictor to masks, reports and previews (batch runner,
case loading, the per-case report, consistency, guide texts, run lock, the `segreport infer` CLI)."""
