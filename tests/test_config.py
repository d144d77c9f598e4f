"""Configuration: precedence (serving.properties over environment), env mapping, typed values,
and startup errors that name the key, the value and where it came from."""

from pathlib import Path

import pytest

from container.config import load_model_config, parse_load_models, parse_properties, resolve_models
from engines.options import ConfigError, environment_settings
from engines.options import load_server_options as load_server_config


def write(d: Path, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "serving.properties").write_text(text)
    return d


def test_defaults_are_lmi_defaults(tmp_path):
    cfg = load_model_config("m", tmp_path, env={})
    assert (cfg.job_queue_size, cfg.batch_size, cfg.max_batch_delay_ms, cfg.max_idle_time_s) == \
        (1000, 1, 100, 60)
    assert cfg.engine == "Python"
    assert cfg.predict_timeout_s == 120 and cfg.model_loading_timeout_s == 1800
    assert dict(cfg.options) == {}


def test_file_wins_over_environment(tmp_path):
    write(tmp_path, "batch_size=4\noption.dtype=fp16\n")
    env = {"SERVING_BATCH_SIZE": "8", "OPTION_DTYPE": "bf16", "SERVING_MAX_BATCH_DELAY": "7",
           "OPTION_MAX_ROLLING_BATCH_SIZE": "16"}
    cfg = load_model_config("m", tmp_path, env=env)
    assert cfg.batch_size == 4
    assert cfg.options["dtype"] == "fp16"
    assert cfg.max_batch_delay_ms == 7  # only in the environment
    assert cfg.options["max_rolling_batch_size"] == "16"


def test_environment_mapping():
    s = environment_settings({
        "OPTION_ENTRYPOINT": "model.py", "OPTION_ENGINE": "MPI", "HF_MODEL_ID": "/m",
        "SM_NUM_GPUS": "4", "TENSOR_PARALLEL_DEGREE": "2", "MAX_BATCH_SIZE": "64",
        "MAX_CONCURRENT_REQUESTS": "9", "SAGEMAKER_NUM_MODEL_WORKERS": "3",
        "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "30", "SAGEMAKER_STARTUP_TIMEOUT": "600",
        "PATH": "/usr/bin", "SERVING_OPTS": "-Xmx1g",
    })
    flat = {k: v.value for k, v in s.items()}
    assert flat == {
        "option.entryPoint": "model.py", "engine": "MPI", "option.model_id": "/m",
        "option.tensor_parallel_degree": "2",  # TENSOR_PARALLEL_DEGREE wins over SM_NUM_GPUS
        "option.max_rolling_batch_size": "64", "job_queue_size": "9",
        "minWorkers": "3", "maxWorkers": "3", "option.predict_timeout": "30",
        "option.model_loading_timeout": "600",
    }
    assert s["engine"].source == "environment variable OPTION_ENGINE"


def test_sm_num_gpus_alone_sets_tp():
    s = environment_settings({"SM_NUM_GPUS": "4"})
    assert s["option.tensor_parallel_degree"].value == "4"


def test_mistyped_value_names_key_value_and_file(tmp_path):
    write(tmp_path, "# comment\nbatch_size=abc\n")
    with pytest.raises(ConfigError) as e:
        load_model_config("m", tmp_path, env={})
    msg = str(e.value)
    assert "batch_size='abc'" in msg and "serving.properties line 2" in msg
    assert str(tmp_path) in msg and "not an integer" in msg


def test_mistyped_env_value_names_variable(tmp_path):
    with pytest.raises(ConfigError, match="SERVING_JOB_QUEUE_SIZE"):
        load_model_config("m", tmp_path, env={"SERVING_JOB_QUEUE_SIZE": "lots"})


def test_unknown_key_fails_with_suggestion(tmp_path):
    write(tmp_path, "batchsize=4\n")
    with pytest.raises(ConfigError) as e:
        load_model_config("m", tmp_path, env={})
    msg = str(e.value)
    assert "'batchsize'" in msg and "did you mean 'batch_size'" in msg
    assert "serving.properties" in msg


def test_unknown_serving_env_fails():
    with pytest.raises(ConfigError, match="SERVING_BATCHSIZE.*did you mean 'SERVING_BATCH_SIZE'"):
        environment_settings({"SERVING_BATCHSIZE": "4"})


def test_option_keys_pass_through(tmp_path):
    write(tmp_path, "option.rolling_batch=disable\noption.entryPoint=my.py\nengine=python\n")
    cfg = load_model_config("m", tmp_path, env={})
    assert cfg.options == {"rolling_batch": "disable", "entryPoint": "my.py"}
    assert cfg.engine == "Python"
    props = cfg.init_properties()
    assert props["entryPoint"] == "my.py" and props["model_dir"] == str(tmp_path)


@pytest.mark.parametrize("text, needle", [
    ("engine=Tensorflow", "engine='Tensorflow'.*not one of"),
    ("batch_size=0", "batch_size='0'.*must be >= 1"),
    ("max_batch_delay=-1", "must be >= 0"),
    ("minWorkers=3\nmaxWorkers=2", "minWorkers=3 is greater than maxWorkers=2"),
    ("option.tensor_parallel_degree=two", "tensor_parallel_degree='two'.*not an integer"),
    ("option.predict_timeout=soon", "predict_timeout='soon'.*not a number"),
    ("just some text", "line 1: cannot parse"),
])
def test_bad_values(tmp_path, text, needle):
    write(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=needle):
        load_model_config("m", tmp_path, env={})


def test_device_prefixed_workers_win(tmp_path):
    write(tmp_path, "minWorkers=1\nmaxWorkers=1\ncpu.minWorkers=2\ncpu.maxWorkers=3\n"
                    "gpu.maxWorkers=8\n")
    cfg = load_model_config("m", tmp_path, env={})
    assert (cfg.min_workers, cfg.max_workers) == (2, 3)
    gpu = load_model_config("m", tmp_path, env={}, device="gpu")
    assert (gpu.min_workers, gpu.max_workers) == (1, 8)


def test_tp_max_accepted(tmp_path):
    write(tmp_path, "option.tensor_parallel_degree=max\n")
    assert load_model_config("m", tmp_path, env={}).options["tensor_parallel_degree"] == "max"


def test_overrides_win(tmp_path):
    write(tmp_path, "batch_size=4\n")
    cfg = load_model_config("m", tmp_path, env={}, overrides={"batch_size": "2"})
    assert cfg.batch_size == 2


def test_properties_syntax():
    s = parse_properties("a=1\n  b : two words \n! bang comment\nc=x\\\n  y\n\n", "f")
    assert {k: v.value for k, v in s.items()} == {"a": "1", "b": "two words", "c": "xy"}


def test_config_is_frozen(tmp_path):
    cfg = load_model_config("m", tmp_path, env={})
    with pytest.raises(Exception):
        cfg.batch_size = 3
    with pytest.raises(TypeError):
        cfg.options["x"] = "y"


def test_server_config():
    assert load_server_config(env={}).port == 8080
    c = load_server_config(env={"SAGEMAKER_BIND_TO_PORT": "9001",
                                "SAGEMAKER_MAX_PAYLOAD_IN_MB": "6"})
    assert c.port == 9001 and c.max_request_size == 6 * 1024 * 1024
    assert load_server_config(env={"SAGEMAKER_MAX_REQUEST_SIZE": "100"}).max_request_size == 100
    assert load_server_config(env={"SAGEMAKER_BIND_TO_PORT": "1"}, port=5).port == 5
    with pytest.raises(ConfigError, match="SAGEMAKER_BIND_TO_PORT='x'"):
        load_server_config(env={"SAGEMAKER_BIND_TO_PORT": "x"})


def test_model_resolution_order(tmp_path):
    a, b, sm, store = tmp_path / "a", tmp_path / "b", tmp_path / "sm", tmp_path / "store"
    for d in (a, b, sm, store / "m1", store / "m2"):
        d.mkdir(parents=True)
    (sm / "config.json").write_text("{}")
    env = {"HF_MODEL_ID": str(b), "SERVING_MODEL_STORE": str(store)}
    assert resolve_models(model_dir=str(a), model_store=None, env=env,
                          sagemaker_dir=str(sm))[0].model_dir == str(a)
    assert resolve_models(model_dir=None, model_store=None, env=env,
                          sagemaker_dir=str(sm))[0].model_dir == str(b)
    env.pop("HF_MODEL_ID")
    got = resolve_models(model_dir=None, model_store=None, env=env, sagemaker_dir=str(sm))
    assert [(s.name, s.model_dir) for s in got] == [("model", str(sm))]
    (sm / "config.json").unlink()  # empty /opt/ml/model is skipped
    got = resolve_models(model_dir=None, model_store=None, env=env, sagemaker_dir=str(sm))
    assert [s.name for s in got] == ["m1", "m2"]
    assert resolve_models(model_dir=None, model_store=None, env={},
                          sagemaker_dir=str(sm)) is None  # -> the default model


def test_hub_ids_s3_and_archives_are_sources_fetched_at_registration(tmp_path):
    none = str(tmp_path / "none")
    for value, name in [("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M"),
                        ("s3://bucket/models/smollm2/", "smollm2")]:
        [spec] = resolve_models(model_dir=None, model_store=None, env={"HF_MODEL_ID": value},
                                sagemaker_dir=none)
        assert (spec.name, spec.model_dir, spec.source) == (name, value, "HF_MODEL_ID")
    (tmp_path / "model.tar.gz").write_bytes(b"")
    [spec] = resolve_models(model_dir=str(tmp_path / "model.tar.gz"), model_store=None, env={})
    assert spec.name == "model"
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve_models(model_dir=str(tmp_path / "missing"), model_store=None, env={})


def test_load_models_forms(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    specs = parse_load_models(f"{tmp_path / 'x'}, named={tmp_path / 'y'}, "
                              f"djl::Python=file://{tmp_path / 'x'}")
    assert [s.name for s in specs] == ["x", "named", "djl"]


def test_mistyped_llm_option_fails_for_the_default_handler(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    write(tmp_path, "option.max_rolling_batch_sise=64\n")
    with pytest.raises(ConfigError) as e:
        load_model_config("m", tmp_path, env={})
    msg = str(e.value)
    assert "'option.max_rolling_batch_sise'" in msg and "serving.properties line 1" in msg
    assert "did you mean 'option.max_rolling_batch_size'" in msg
    write(tmp_path, "option.dtype=fp32\n")
    # option.quantize is the native engine's; this model (no architecture) gets hf.
    with pytest.raises(ConfigError, match=r"option.quantize='awq' \(from environment variable "
                                          r"OPTION_QUANTIZE\) is read by the native, vllm engines"):
        load_model_config("m", tmp_path, env={"OPTION_QUANTIZE": "awq"})


def test_llm_options_checked_with_lmi_entry_point_but_not_for_custom_model_py(tmp_path):
    write(tmp_path, "option.entryPoint=djl_python.huggingface\noption.my_knob=3\n")
    with pytest.raises(ConfigError, match="option.my_knob"):
        load_model_config("m", tmp_path, env={})
    custom = tmp_path / "custom"
    write(custom, "option.my_knob=3\n")
    (custom / "model.py").write_text("def handle(inputs):\n    return None\n")
    assert load_model_config("m", custom, env={}).options["my_knob"] == "3"
    known = tmp_path / "known"
    write(known, "option.rolling_batch=native\noption.dtype=bf16\noption.tgi_compat=true\n")
    assert load_model_config("m", known, env={"HF_REVISION": "main"}).options["dtype"] == "bf16"
