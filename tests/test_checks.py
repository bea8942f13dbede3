"""course_lib.checks: the argument checks that every module shares, each refusing with the bad value named."""

import numpy as np
import pytest
import torch

from course_lib.checks import (
    as_integer,
    check_model_output,
    check_model_predicts,
    check_record_every,
    check_single_timestep,
    check_steps,
)

INTEGERS = [7, np.int64(7), np.int32(7), np.uint8(7), torch.tensor(7), torch.tensor(7, dtype=torch.int32)]
NOT_INTEGERS = [
    7.0,
    2.5,
    np.float64(7.0),
    True,
    np.True_,
    torch.tensor(True),
    torch.tensor(7.0),
    torch.tensor([7]),
    "7",
]


@pytest.mark.parametrize("value", INTEGERS, ids=repr)
def test_every_kind_of_integer_is_taken_as_a_python_int(value):
    for result in (as_integer(value), check_steps(value), check_steps(value, 10), check_record_every(value)):
        assert result == 7 and type(result) is int
    assert check_single_timestep("t", value, 10) == 7


@pytest.mark.parametrize("value", NOT_INTEGERS, ids=repr)
def test_bools_floats_and_shaped_tensors_are_not_integers(value):
    assert as_integer(value) is None
    with pytest.raises(ValueError, match="steps must be an integer >= 1; got steps="):
        check_steps(value)
    with pytest.raises(ValueError, match=r"steps must be an integer in 1..T \(T=10\); got steps="):
        check_steps(value, 10)
    with pytest.raises(TypeError, match=r"t must be one integer timestep in 0..9 \(T=10\); got t="):
        check_single_timestep("t", value, 10)


def test_the_range_of_steps_and_timesteps_is_checked():
    assert check_steps(1000) == 1000  # no T: any number of steps (continuous time)
    with pytest.raises(ValueError, match="got steps=11"):
        check_steps(11, 10)
    with pytest.raises(ValueError, match="got steps=0"):
        check_steps(np.int64(0))
    with pytest.raises(ValueError, match=r"timestep t_next=-1 is out of range; valid: 0..9 \(T=10\)"):
        check_single_timestep("t_next", -1, 10)
    assert check_single_timestep("t_next", np.int64(-1), 10, clean_data=True) == -1
    with pytest.raises(ValueError, match=r"t=10 is out of range; valid: 0..9 or -1 \(the clean data\)"):
        check_single_timestep("t", torch.tensor(10), 10, clean_data=True)
    with pytest.raises(ValueError, match="record_every must be >= 0; got -1"):
        check_record_every(-1)


class Predicts(torch.nn.Module):
    def __init__(self, prediction_type):
        super().__init__()
        self.prediction_type = prediction_type


def test_a_model_is_refused_only_when_it_declares_another_prediction_type():
    check_model_predicts(Predicts("eps"), "eps")
    check_model_predicts(Predicts(None), "v")  # loaded without a schedule: nothing declared
    check_model_predicts(lambda xt, t: xt, "eps")  # a plain function is taken at its caller's word
    with pytest.raises(ValueError, match="the model predicts 'velocity'.*read its output as 'eps'"):
        check_model_predicts(Predicts("velocity"), "eps")


def test_a_non_finite_model_output_says_where_and_whether_the_state_was_already_bad():
    finite, bad = torch.zeros(2, 3), torch.tensor([[0.0, float("nan"), 0.0], [float("inf"), 0.0, 0.0]])
    check_model_output(finite, finite, "t=5")
    with pytest.raises(FloatingPointError, match=r"the model output at t=5 holds 2 NaN or infinite values \(of 6\)"):
        check_model_output(bad, finite, "t=5")
    with pytest.raises(FloatingPointError, match="the state given to the model at t=5 holds 2 NaN"):
        check_model_output(bad, bad, "t=5")
