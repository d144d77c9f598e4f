"""The typed options schema (engines/options.py): strict parsing at startup, the check that the
chosen engine reads every option it is given, the plan that travels to the worker, and the README
tables generated from the schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny_models import make_tiny_llama

from container.config import load_model_config
from engines.options import (ENGINE_OPTIONS, ConfigError, NativeOptions, markdown_tables,
                             parse_options, Setting)
from engines.selection import LLMPlan

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A model dir the native engine supports (config.json only matters at startup)."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "llama")


def config(model_dir: Path, text: str = "", env: dict | None = None):
    (model_dir / "serving.properties").write_text(text)
    return load_model_config("m", model_dir, env=env or {}, gpus=[])


def test_the_plan_is_typed_and_survives_the_wire(llama):
    cfg = config(llama, "option.max_rolling_batch_size=8\noption.enable_prefix_caching=FALSE\n"
                        "option.dtype=float32\noption.tgi_compat=true\n")
    plan = cfg.llm
    assert plan.engine.name == "native" and plan.engine.reason == "option.rolling_batch=auto"
    options = plan.engine.options
    assert isinstance(options, NativeOptions)
    assert (options.max_rolling_batch_size, options.enable_prefix_caching, options.dtype) == \
        (8, False, "fp32")
    assert plan.handler.tgi_compat is True
    assert LLMPlan.from_wire(plan.to_wire()) == plan
    # CPU default for the running-request cap, resolved at selection, not left as None.
    assert config(llama).llm.engine.options.max_rolling_batch_size == 32


@pytest.mark.parametrize("line, needle", [
    ("option.enable_prefix_caching=ture",
     r"option.enable_prefix_caching='ture' is not true or false \(from .*serving.properties "
     r"line 1\)"),
    ("option.max_rolling_batch_size=many",
     r"option.max_rolling_batch_size='many' is not an integer \(from .*serving.properties"),
    ("option.max_rolling_batch_size=0", r"option.max_rolling_batch_size='0' must be >= 1"),
    ("option.gpu_memory_utilization=1.5", r"option.gpu_memory_utilization='1.5' must be <= 1"),
    ("option.attention_backend=flash",
     r"option.attention_backend='flash' is not one of auto, triton, torch"),
    ("option.dtype=int4", r"option.dtype='int4' is not one of auto, fp32, fp16, bf16"),
    ("option.rolling_batch=paged", r"option.rolling_batch='paged' is not one of auto, native"),
    ("option.rolling_batch=trtllm", r"option.rolling_batch=trtllm needs the tensorrt_llm "
                                    r"package and an NVIDIA GPU; missing here"),
    ("option.rolling_batch=neuronx", r"option.rolling_batch=neuronx needs the neuronx-"
                                     r"distributed-inference package and an AWS Neuron device"),
])
def test_bad_values_fail_at_startup_naming_key_value_and_source(llama, line, needle):
    with pytest.raises(ConfigError, match=needle):
        config(llama, line + "\n")


def test_an_env_value_names_its_variable(llama):
    with pytest.raises(ConfigError, match=r"option.max_rolling_batch_size='lots' is not an "
                                          r"integer \(from environment variable MAX_BATCH_SIZE\)"):
        config(llama, env={"MAX_BATCH_SIZE": "lots"})


def test_a_key_the_chosen_engine_does_not_read_fails(llama):
    with pytest.raises(ConfigError) as e:
        config(llama, "option.rolling_batch=disable\noption.enforce_eager=true\n")
    msg = str(e.value)
    assert "option.enforce_eager='true'" in msg and "serving.properties line 2" in msg
    assert "read by the native, vllm engines" in msg and "served by the hf engine" in msg
    assert "option.rolling_batch=disable" in msg  # why hf was chosen
    # The same from the environment, with dynamic batching choosing hf.
    with pytest.raises(ConfigError, match=r"option.max_rolling_batch_size='64' \(from "
                                          r"environment variable MAX_BATCH_SIZE\) is read by the "
                                          r"native, vllm, trtllm, neuronx engines.*batch_size > 1"):
        config(llama, "batch_size=4\n", env={"MAX_BATCH_SIZE": "64"})


def test_unknown_key_suggests_the_closest(llama):
    with pytest.raises(ConfigError, match=r"unknown key 'option.enable_prefix_cache'.*did you "
                                          r"mean 'option.enable_prefix_caching'"):
        config(llama, "option.enable_prefix_cache=true\n")


def test_a_custom_model_py_keeps_free_form_options(tmp_path):
    (tmp_path / "model.py").write_text("def handle(inputs):\n    return None\n")
    cfg = config(tmp_path, "option.enforce_eager=whatever\noption.my_knob=1\n")
    assert cfg.llm is None and cfg.options == {"enforce_eager": "whatever", "my_knob": "1"}


def test_parse_options_ignores_keys_of_other_classes():
    s = {"option.dtype": Setting("bf16", "x"), "option.tgi_compat": Setting("maybe", "x")}
    assert parse_options(ENGINE_OPTIONS["hf"], s).dtype == "bf16"


def test_readme_option_tables_match_the_schema():
    text = README.read_text()
    m = re.search(r"<!-- options:begin -->\n(.*?)<!-- options:end -->", text, re.S)
    assert m, "README.md lacks the generated option tables (<!-- options:begin/end -->)"
    assert m.group(1) == markdown_tables(), (
        "README option tables are stale: regenerate them with "
        "`.venv/bin/python -m engines.options --markdown`")


def test_lmi_async_mode_switch_is_accepted_for_the_default_handler(llama):
    # LMI's deployment recipes set OPTION_ASYNC_MODE=true; the default handler is concurrent
    # anyway, so it loads and changes nothing. A value that is not a boolean still fails.
    assert config(llama, env={"OPTION_ASYNC_MODE": "true"}).llm.handler.async_mode is True
    with pytest.raises(ConfigError, match=r"option.async_mode.*'ture'"):
        config(llama, env={"OPTION_ASYNC_MODE": "ture"})
