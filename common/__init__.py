"""Value types both sides share: the recipe model, the plan and its batching, registries, errors, redaction.

The driver (orchestrator/) and the worker and storage layers (workers/, storage/) import this
package downward; it imports nothing from orchestrator/ or workers/ (tests/test_layering.py).
"""
