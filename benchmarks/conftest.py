from __future__ import annotations

import torch

from suite.run.environment import device_name, resolve_device


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every number carries its environment: torch, device, threads, dtype."""
    device = resolve_device("auto")
    machine_info["torch_version"] = torch.__version__
    machine_info["device"] = device.type
    machine_info["device_name"] = device_name(device)
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["dtype"] = "bfloat16" if device.type == "cuda" else "float32"
