"""scripts/bench_scale.py: the models it writes are the real shapes and load; a method's run on
weights on disk reports what it measured; --device cuda stops before writing when CUDA is absent."""

import json
import math

import pytest
import torch

from tests.scripts.helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_scale")


def test_the_8b_shape_is_llama_3_8b_and_the_70b_block_is_llama_3_70b(bench):
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    def parameters(shape):
        with init_empty_weights():
            model = LlamaForCausalLM(LlamaConfig(**bench.llama_config(shape)))
        return sum(p.numel() for p in model.parameters()), model.config

    count, config = parameters(bench.shape_of("8b", None))
    assert count == 8_030_261_248  # Meta-Llama-3-8B
    assert config.rope_parameters["rope_theta"] == 500000
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    # 70B blocks: Llama-3-70B has 70_553_706_496 parameters in 80 such blocks plus the
    # embedding, the head and the final norm
    count, _ = parameters(bench.shape_of("70b", 5))  # --blocks applies to the 8b shape only
    outside = 2 * 128256 * 8192 + 8192
    assert (70_553_706_496 - outside) % 80 == 0
    assert count - outside == 2 * (70_553_706_496 - outside) // 80  # two: a chain needs two


def test_the_written_model_loads_in_transformers_and_maps_from_disk(bench, tmp_path):
    from transformers import AutoModelForCausalLM

    from ppq_lightning.models.loading import load_causal_lm
    from ppq_lightning.modules.offload import disk_weights, stored

    shape = bench.shape_of("tiny", None)
    written = bench.write_model(tmp_path / "m", shape, seed=0)
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(files) == shape["blocks"] + 2  # one shard per block, the embedding, the head
    assert written["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "m").iterdir()
                                           if p.suffix == ".safetensors")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    q = model.model.layers[1].self_attn.q_proj.weight.float()
    assert abs(q.std().item() - 0.02) < 0.002 and not torch.equal(
        q, model.model.layers[0].self_attn.q_proj.weight.float()
    )
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    mapped = load_causal_lm(
        str(tmp_path / "m"), dtype="bfloat16", offload_folder=str(tmp_path / "o")
    )
    assert disk_weights(mapped) is not None and stored(mapped.lm_head.weight)
    for key, value in model.state_dict().items():
        assert torch.equal(value, mapped.state_dict()[key]), key
    again = bench.write_model(tmp_path / "m", shape, seed=0)
    assert again["reused"]  # the same config and seed: not written twice


def test_a_method_on_weights_on_disk_reports_memory_time_floor_and_traffic(bench, tmp_path):
    shape = bench.shape_of("tiny", None)
    bench.write_model(tmp_path / "m", shape, seed=0)
    out = tmp_path / "gptq.json"
    bench.main(
        [f"--child={out}", "--method=gptq", f"--model-dir={tmp_path / 'm'}", "--gptq-blocks=1",
         "--calibration=2x16", "--eval-windows=1", f"--workdir={tmp_path}"]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["blocks"] == 2 and report["blocks_compressed"] == 1
    assert report["layers_compressed"] == 7  # q, k, v, o, gate, up, down of block 0 only
    assert math.isfinite(report["ppl"])
    traffic = report["traffic"]
    one_block = sum(math.prod(dims) * 2 for _, dims in bench.block_tensors(shape, 0))
    assert traffic["written_bytes"] > 0 and 0 < traffic["peak_resident"] <= one_block
    assert report["floor"]["floor_blocks"] == 1 and report["floor"]["hessian_seconds_mean"] >= 0
    assert report["solve_seconds_per_block"] > 0
    assert report["floor_seconds_per_block"] > report["solve_seconds_per_block"]
    assert report["ru_maxrss_bytes"] >= report["memory_peaks"]["stage"]["VmRSS"] > 0
    assert not list(tmp_path.glob("gptq-*"))  # its offload folder is deleted


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_stops_before_writing_anything(bench, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=r"--device cuda: CUDA is not available.*--device cpu"):
        bench.main(["--device=cuda", "--shapes=tiny", f"--workdir={work}"])
    assert not work.exists()


def test_a_bad_calibration_shape_is_refused_naming_it(bench):
    with pytest.raises(SystemExit):
        bench.parse(["--calibration", "8by512"])
    assert bench.calibration_shape("8x512") == (8, 512)
    with pytest.raises(SystemExit):  # one decoder layer: the engine would find no blocks
        bench.parse(["--blocks", "1"])
