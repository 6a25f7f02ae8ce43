"""``trainer.profile_steps=[a,b]``: a ``torch.profiler`` trace of optimizer steps a to b
(1-based, inclusive, as ``step`` in metrics.jsonl), written as Chrome/Perfetto JSON to
``<run_dir>/trace_steps_a-b.json`` (``trace_rank<r>_steps_a-b.json`` per rank when there are
several). CPU activity always, CUDA kernels on GPUs. The trainer marks the parts of a step
with ``record_function`` ranges: ``forward`` and ``backward`` per micro-batch, ``zo_forward``
for each forward-only (zeroth-order) pass, ``perturb`` around the sharpness-aware ascent and
``fused_update`` for each unit the fused hooks update inside the backward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    def __init__(self, steps: list[int] | None, run_dir: Path, device: torch.device, ranks):
        self.steps = steps
        self.device = device
        name = f"trace_rank{ranks.rank}" if ranks.world > 1 else "trace"
        self.path = run_dir / f"{name}_steps_{steps[0]}-{steps[1]}.json" if steps else None
        self._prof: profile | None = None

    def before(self, step: int) -> None:
        """Called before update ``step`` (1-based) runs."""
        if self.steps and step == self.steps[0]:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities)
            self._prof.__enter__()

    def after(self, step: int) -> None:
        """Called after update ``step``; writes the trace after the last profiled one."""
        if self._prof is not None and step == self.steps[1]:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._prof.__exit__(None, None, None)
            self._prof.export_chrome_trace(str(self.path))
            self._prof = None
