"""Placement: which dense blocks and which FFN neurons the GPU partition holds, under a VRAM budget.

    from pi_backend.placement import ModelSizes, CostModel, solve_placement, format_report
    placement = solve_placement(stats, sizes, budget_bytes)       # stats: per-layer frequencies

At load time `plan_for_model` adds the statistics files, the cache beside the model and PowerInfer's
`.generated.gpuidx`. `python -m pi_backend.placement MODEL --vram-budget GiB` prints the report.
"""
from pi_backend.placement.cache import (
    GpuIndex,
    cache_path,
    gpuidx_path,
    model_hash,
    read_gpuidx,
    read_placement_cache,
    stats_hash,
    write_gpuidx,
    write_placement_cache,
)
from pi_backend.placement.cost import CostModel, measure_cpu_bytes_per_s
from pi_backend.placement.plan import find_activation_dir, plan_for_model
from pi_backend.placement.report import format_report, plot_placement
from pi_backend.placement.sizes import DenseBlock, ModelSizes, kv_cache_bytes
from pi_backend.placement.solver import Placement, PlacementError, solve_placement

__all__ = [
    "CostModel", "DenseBlock", "GpuIndex", "ModelSizes", "Placement", "PlacementError", "cache_path",
    "find_activation_dir", "format_report", "gpuidx_path", "kv_cache_bytes", "measure_cpu_bytes_per_s",
    "model_hash", "plan_for_model", "plot_placement", "read_gpuidx", "read_placement_cache", "solve_placement",
    "stats_hash", "write_gpuidx", "write_placement_cache",
]
