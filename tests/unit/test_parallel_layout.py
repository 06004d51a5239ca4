import pytest

from megatron_patch.parallel import ParallelLayout


def test_data_parallel_size():
    assert ParallelLayout(tp=2, pp=2).data_parallel_size(8) == 2
    with pytest.raises(ValueError, match="world size 6 is not divisible by TP\\*PP\\*CP = 4"):
        ParallelLayout(tp=2, pp=2).data_parallel_size(6)


def test_expert_parallel_must_fit_a_pipeline_stage():
    ParallelLayout(pp=2, ep=2).validate(4)  # 2 ranks per stage hold 2 expert shards
    with pytest.raises(ValueError, match="EP\\*ETP = 4 does not divide the 2 ranks"):
        ParallelLayout(pp=2, ep=4).validate(4)


def test_megatron_sizes_use_megatron_names():
    sizes = ParallelLayout(tp=2, pp=4, ep=8, etp=1, cp=2, virtual_pp=2).megatron_sizes()
    assert sizes == {
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 4,
        "virtual_pipeline_model_parallel_size": 2, "context_parallel_size": 2,
        "expert_model_parallel_size": 8, "expert_tensor_parallel_size": 1,
    }
