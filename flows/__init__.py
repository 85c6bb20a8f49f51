"""Prefect orchestration for fer: the retrain flow, its deployments, and remote triggering.

Only this package imports Prefect; every task is a thin call into ``fer.*``.
"""
