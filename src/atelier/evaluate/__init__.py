"""Benchmarks for editing methods: PIE-Bench (`atelier evaluate pie-bench`) and its metrics.

    from atelier.evaluate import load_metric_suite, run_pie_bench
    result = run_pie_bench("PIE-Bench_v1", "img2img", pipe=pipe, suite=load_metric_suite(dino="dino-vitb8/"))

Metric functions are in `atelier.evaluate.metrics`; editing methods by name in
`atelier.evaluate.methods` (the built-ins plus `atelier.edit.METHODS`).
"""

from atelier.evaluate.methods import available_methods, get_method
from atelier.evaluate.pie_bench import (
    EDITING_TYPES,
    METRICS,
    MetricSuite,
    PieCase,
    case_mask,
    decode_mask,
    evaluate_case,
    format_summary,
    load_cases,
    load_metric_suite,
    run_pie_bench,
    strip_brackets,
    write_results,
)

__all__ = [
    "EDITING_TYPES",
    "METRICS",
    "MetricSuite",
    "PieCase",
    "available_methods",
    "case_mask",
    "decode_mask",
    "evaluate_case",
    "format_summary",
    "get_method",
    "load_cases",
    "load_metric_suite",
    "run_pie_bench",
    "strip_brackets",
    "write_results",
]
