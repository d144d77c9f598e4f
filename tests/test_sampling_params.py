"""SamplingParams: LMI defaults, JSON conversion and one ValidationError per bad value."""

import pytest

from engines.types import ACCEPTED_PARAMETERS, FinishReason, SamplingParams, ValidationError


def test_defaults_are_lmi_defaults_and_mean_off():
    p = SamplingParams.from_request({})
    assert (p.max_new_tokens, p.do_sample, p.temperature, p.top_k, p.top_p) == (
        30,
        False,
        1.0,
        0,
        1.0,
    )
    assert (p.min_new_tokens, p.min_p, p.typical_p, p.repetition_penalty) == (0, 0.0, 1.0, 1.0)
    assert (p.presence_penalty, p.frequency_penalty, p.top_n_tokens) == (0.0, 0.0, 0)
    assert (p.stop_sequences, p.stop_token_ids) == ((), ())
    assert not p.ignore_eos_token and not p.decoder_input_details
    assert p.greedy
    assert SamplingParams(do_sample=True, temperature=0).greedy
    assert not SamplingParams(do_sample=True).greedy
    assert FinishReason.EOS_TOKEN.value == "eos_token"


def test_from_request_converts_json_lists():
    p = SamplingParams.from_request(
        {"stop_sequences": ["a", "b"], "stop_token_ids": [2, 7], "top_n_tokens": 3}
    )
    assert p.stop_sequences == ("a", "b") and p.stop_token_ids == (2, 7)
    assert SamplingParams.from_request({"stop_sequences": "x"}).stop_sequences == ("x",)
    assert SamplingParams.from_request({"stop_sequences": None}).stop_sequences == ()
    assert SamplingParams.from_request({"stop_token_ids": None}).stop_token_ids == ()
    assert SamplingParams.from_request(None) == SamplingParams()


def test_every_field_is_an_accepted_parameter():
    assert (
        "stop_token_ids" in ACCEPTED_PARAMETERS and "decoder_input_details" in ACCEPTED_PARAMETERS
    )
    with pytest.raises(ValidationError, match="unknown parameter.*'max_tokens'.*max_new_tokens"):
        SamplingParams.from_request({"max_tokens": 3})
    with pytest.raises(ValidationError, match="must be a JSON object"):
        SamplingParams.from_request(["max_new_tokens"])


GOOD_EDGES = [
    {"min_new_tokens": 30},
    {"min_p": 0},
    {"min_p": 1},
    {"typical_p": 1},
    {"typical_p": 1e-9},
    {"repetition_penalty": 1e-3},
    {"presence_penalty": -2},
    {"frequency_penalty": 2},
    {"stop_token_ids": [0]},
    {"top_n_tokens": 20},
    {"ignore_eos_token": True},
    {"decoder_input_details": True},
]


@pytest.mark.parametrize("values", GOOD_EDGES)
def test_values_at_the_limits_are_accepted(values):
    params = SamplingParams.from_request(values)
    for key, value in values.items():
        got = getattr(params, key)
        assert got == (tuple(value) if isinstance(value, list) else value), key


BAD = [
    ("max_new_tokens", 0, ">= 1"),
    ("max_new_tokens", True, "must be an integer"),
    ("min_new_tokens", -1, ">= 0"),
    ("min_new_tokens", 1.5, "must be an integer"),
    ("min_new_tokens", 31, r"<= max_new_tokens \(30\)"),
    ("min_p", -0.1, r"in \[0, 1\]"),
    ("min_p", 1.5, r"in \[0, 1\]"),
    ("min_p", "0.1", "must be a number"),
    ("typical_p", 0, r"in \(0, 1\]"),
    ("typical_p", 1.01, r"in \(0, 1\]"),
    ("repetition_penalty", 0, r"in \[1e-06, 1e\+06\]"),
    ("repetition_penalty", -1.0, r"in \[1e-06, 1e\+06\]"),
    ("repetition_penalty", 5e-324, r"in \[1e-06, 1e\+06\]"),  # 0 in float32 (fuzzing)
    ("repetition_penalty", 1e7, r"in \[1e-06, 1e\+06\]"),
    ("presence_penalty", 2.5, r"in \[-2, 2\]"),
    ("presence_penalty", float("nan"), "finite"),
    ("frequency_penalty", -3, r"in \[-2, 2\]"),
    ("frequency_penalty", None, "must be a number"),
    ("temperature", -1, ">= 0"),
    ("temperature", float("nan"), "finite"),
    ("top_k", -1, ">= 0"),
    ("top_p", 0, r"in \(0, 1\]"),
    ("seed", -1, ">= 0"),
    ("seed", 2**64, "<="),
    ("stop_sequences", [""], "non-empty strings"),
    ("stop_sequences", 5, "a string or a list of strings"),
    ("stop_token_ids", [-1], "integers >= 0"),
    ("stop_token_ids", ["2"], "integers >= 0"),
    ("stop_token_ids", [True], "integers >= 0"),
    ("stop_token_ids", 2, "a list of integers"),
    ("ignore_eos_token", "yes", "true or false"),
    ("ignore_eos_token", 1, "true or false"),
    ("decoder_input_details", 0, "true or false"),
    ("do_sample", "true", "true or false"),
    ("top_n_tokens", 21, "<= 20"),
    ("top_n_tokens", -1, ">= 0"),
    ("top_n_tokens", 2.0, "must be an integer"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_bad_value_names_the_field_and_the_limit(name, value, message):
    with pytest.raises(ValidationError, match=message) as caught:
        SamplingParams.from_request({name: value})
    assert caught.value.field == name
    assert name in caught.value.message


@pytest.mark.parametrize("extreme", [{"top_p": 5e-324}, {"temperature": 1e-300}])
def test_values_too_small_for_float32_still_sample_the_top_token(extreme):
    """Found by fuzzing: a positive top_p or temperature that float32 cannot hold used to
    break sampling; both now mean 'the most likely token', as their limit does."""
    import math

    import torch

    from engines.sampler import RowState, sample_rows

    params = SamplingParams(do_sample=True, seed=1, **{"temperature": 1.0, **extreme})
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    out = sample_rows(logits, [RowState(params, [], frozenset(), device=torch.device("cpu"))])
    assert out.token_ids == [1] and math.isfinite(out.log_probs[0])
