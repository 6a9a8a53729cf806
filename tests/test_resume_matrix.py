"""Resume on another layout with the real loader (issue 15 item 4): train 2N steps on layout A saving at N
(the uninterrupted run), resume from N on layout B to 2N, and compare with the uninterrupted run.

Real shards and the global data order (not the synthetic stream). N = 2, 8 sequences of 16 tokens per step.
Every run of one process group happens in one job (the parallel state is rebuilt between runs), so the
whole matrix costs three process-group start-ups:

=====================  ====================================  ========================================
A -> B                 what                                   compared with the uninterrupted A run
=====================  ====================================  ========================================
DP2 -> DP2             distributed optimizer, same layout      losses and grad norms bitwise
DP2 -> DP1             distributed optimizer, 2 -> 4 micro-b.  losses 1e-5 rel., sample ids per step equal
DP1 -> DP2             distributed optimizer                   losses 1e-5 rel., sample ids per step equal
TP2 -> TP1             distributed optimizer                   losses 2e-4 rel., sample ids equal
TP1 -> TP2             distributed optimizer                   losses 2e-4 rel., sample ids equal
PP2 -> PP1                                                     losses 2e-4 rel., sample ids equal
CP2 -> CP1                                                     losses 2e-4 rel., sample ids equal
PP2 x VPP2 -> PP1      4 layers, interleaved -> no pipeline    losses 2e-4 rel., sample ids equal
=====================  ====================================  ========================================

DP changes keep the global batch by gradient accumulation; the losses differ only by the order of float32
sums (hence 1e-5). TP/PP/CP change the reduction order inside the model as well (2e-4, as
``test_resharded_resume``). The ids are those of the samples each step trained on, gathered over the DP
ranks: the set of samples, and their order, is the uninterrupted run's.
"""

from __future__ import annotations

import pytest
from dist import run_distributed
from real_data import WORDS, SampleIdRecorder, prepare_word_dataset

N = 2

pytestmark = [pytest.mark.dist, pytest.mark.slow]

DO = {"use_distributed_optimizer": True}
LAYOUTS = {
    "dp2_do": dict(DO),
    "dp1_do": dict(DO),
    "tp2_do": dict(DO, tensor_model_parallel_size=2),
    "tp1_do": dict(DO),
    "pp2": {"pipeline_model_parallel_size": 2},
    "pp1": {},
    "cp2": {"context_parallel_size": 2},
    "cp1": {},
    "vpp": {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1, "num_layers": 4},
    "vpp_off": {"num_layers": 4},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    words = WORDS + ["night", "crown", "love", "death", "speak", "lord"]
    return prepare_word_dataset(tmp_path_factory.mktemp("matrix"), 1, words, 40, 160, 50)



def _one_run(data: str, layout: str, extra: dict) -> dict:
    import torch
    from jobs import tiny_cfg
    from megatron.core import parallel_state as ps

    from megatron_mdm import runtime
    from megatron_mdm.training.data import build_data
    from megatron_mdm.training.loop import Trainer

    cfg = tiny_cfg(tokenizer=f"{data}/tok", data_path=[f"{data}/shards"], num_workers=0, train_iters=2 * N,
                   **LAYOUTS[layout], **extra)
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    tok, loader, _ = build_data(cfg)
    rec = SampleIdRecorder(loader)
    trainer = Trainer(cfg, tok.vocab_size, tok.mask_id, tok.pad_id, rec)
    try:
        trainer.load()
        result = trainer.train()
    finally:  # the next run of this job builds its own
        from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

        destroy_num_microbatches_calculator()
    mb = trainer.num_microbatches
    steps = [sum(rec.ids[i * mb:(i + 1) * mb], []) for i in range(len(rec.ids) // mb)]
    # the samples of each step over the DP ranks (one reader per replica: TP/CP rank 0 of the first stage)
    reader = (ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
              and ps.is_pipeline_first_stage(ignore_virtual=True))
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (ps.get_data_parallel_rank(), steps if reader else None))
    per_dp = dict(sorted((dp, s) for dp, s in gathered if s is not None))
    global_steps = [sum((per_dp[dp][i] for dp in per_dp), []) for i in range(len(next(iter(per_dp.values()))))]
    return {"losses": result["losses"], "grad_norms": [h["grad_norm"] for h in trainer.history],
            "iteration": result["iteration"], "steps": global_steps}


def matrix_job(rank: int, world: int, data: str, runs: list) -> list:
    """Runs ``(layout, run_dir, mode)`` in order: mode "save" trains 2N saving at N, "resume" loads N."""
    out = []
    for layout, run_dir, mode in runs:
        extra = ({"save": run_dir, "save_interval": N} if mode == "save"
                 else {"load": run_dir, "ckpt_iteration": N})
        out.append(_one_run(data, layout, extra))
    return out


def _close(got: list, want: list, rtol: float, what: str) -> None:
    assert len(got) == len(want), (what, got, want)
    print(f"{what}: max relative loss difference {max(abs(x - y) / abs(y) for x, y in zip(got, want)):.1e}")
    for x, y in zip(got, want):
        assert abs(x - y) <= rtol * abs(y), (what, got, want)


def test_resume_matrix_on_the_real_loader(data, tmp_path):
    d = str(data)
    run = {name: str(tmp_path / name) for name in ("dp2_do", "dp1_do", "tp2_do", "pp2", "cp2", "vpp")}
    # the uninterrupted runs on two processes, each saving at N
    two = run_distributed(matrix_job, 2, d, [(name, run[name], "save")
                                             for name in ("dp2_do", "tp2_do", "pp2", "cp2", "vpp")])[0]
    full = dict(zip(("dp2_do", "tp2_do", "pp2", "cp2", "vpp"), two))
    # one process: the DP1 uninterrupted run, and every resume onto one process
    one = run_distributed(matrix_job, 1, d, [("dp1_do", run["dp1_do"], "save"),
                                             ("dp1_do", run["dp2_do"], "resume"),
                                             ("tp1_do", run["tp2_do"], "resume"),
                                             ("pp1", run["pp2"], "resume"),
                                             ("cp1", run["cp2"], "resume"),
                                             ("vpp_off", run["vpp"], "resume")])[0]
    full["dp1_do"] = one[0]
    # two processes again: the same layout, and the resumes onto two processes from the DP1 run
    same, dp_up, tp_up = run_distributed(matrix_job, 2, d, [("dp2_do", run["dp2_do"], "resume"),
                                                            ("dp2_do", run["dp1_do"], "resume"),
                                                            ("tp2_do", run["dp1_do"], "resume")])[0]

    for f in full.values():
        assert f["iteration"] == 2 * N and len(f["losses"]) == 2 * N
    # every layout trains on the same samples in the same order (the data order is global)
    for name, f in full.items():
        assert f["steps"] == full["dp1_do"]["steps"], name
    tail = slice(N, 2 * N)

    assert same["losses"] == full["dp2_do"]["losses"][tail]  # bitwise
    assert same["grad_norms"] == full["dp2_do"]["grad_norms"][tail]
    assert same["steps"] == full["dp2_do"]["steps"][tail]

    cases = [("DP2 -> DP1", one[1], "dp2_do", 1e-5), ("DP1 -> DP2", dp_up, "dp1_do", 1e-5),
             ("TP2 -> TP1", one[2], "tp2_do", 2e-4), ("TP1 -> TP2", tp_up, "dp1_do", 2e-4),
             ("PP2 -> PP1", one[3], "pp2", 2e-4), ("CP2 -> CP1", one[4], "cp2", 2e-4),
             ("VPP on -> off", one[5], "vpp", 2e-4)]
    for what, got, ref, rtol in cases:
        assert got["iteration"] == 2 * N, what
        _close(got["losses"], full[ref]["losses"][tail], rtol, what)
        assert got["steps"] == full[ref]["steps"][tail], what
