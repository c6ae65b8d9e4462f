import pytest
import torch

from cookbook import count_parameters, generate_text
from cookbook.errors import MissingDependencyError, ModelLoadError, require_cuda, GPURequiredError, require_module
from cookbook.models import load_model, model_name, resolve_device, resolve_dtype, tiny_model


def test_default_model_is_the_real_pretrained_gemma(real_model):
    model, tok = real_model
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert count_parameters(model) == 268_098_176
    text = generate_text(model, tok, "The capital of France is", max_new_tokens=8)
    assert "Paris" in text or "France" in text


def test_env_var_chooses_the_model(monkeypatch):
    monkeypatch.setenv("COOKBOOK_MODEL", "org/some-model")
    assert model_name() == "org/some-model"
    assert model_name("explicit/name") == "explicit/name"


def test_unknown_name_gives_a_clear_error():
    with pytest.raises(ModelLoadError, match="Unknown model"):
        load_model("not a model name!")


def test_hub_id_while_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model")


def test_missing_optional_package_names_pip_install():
    with pytest.raises(MissingDependencyError, match="pip install not-a-real-package"):
        require_module("not_a_real_package_xyz", "not-a-real-package", "a test")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_gpu_only_call_on_cpu_explains():
    with pytest.raises(GPURequiredError, match="CUDA GPU"):
        require_cuda("The 2:4 sparse kernel")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("float8", cpu)


def test_tiny_model_runs():
    model = tiny_model()
    logits = model(torch.randint(0, 512, (2, 10))).logits
    assert logits.shape == (2, 10, 512)


def test_cached_tokenizer_repeats_from_pretrained_and_recovers_from_a_bad_pickle(real_model, tmp_path):
    import shutil

    import transformers

    from cookbook.models import cached_tokenizer, default_model_path

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, tmp_path / name)
    text = "ROMEO: But soft, what light through yonder window breaks?\ndef f(x):\n    return x ** 2"
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path)(text).input_ids
    first = cached_tokenizer(tmp_path)  # builds it and leaves the pickle
    pickles = list(tmp_path.glob("tokenizer-*.pkl"))
    assert len(pickles) == 1
    second = cached_tokenizer(tmp_path)  # from the pickle
    assert first(text).input_ids == second(text).input_ids == expected
    assert second.bos_token_id == real_model[1].bos_token_id
    pickles[0].write_bytes(b"not a pickle")  # e.g. a write cut short
    assert cached_tokenizer(tmp_path)(text).input_ids == expected
    assert list(tmp_path.glob("tokenizer-*.pkl")) == pickles and not list(tmp_path.glob("*.tmp"))
