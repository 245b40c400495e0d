"""nodes/errors.py: ``node_errors`` puts the node's title on a user error, and
``check_number_inputs`` refuses NaN and infinite FLOATs and unordered pairs, on a toy node and on
every node of the pack, before the node does any work."""

import inspect
import math

import pytest

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def errors(comfy_modules):
    from prefpersonalize.nodes import errors

    return errors


@pytest.fixture(scope="module")
def toy(errors):
    from comfy_api.v0_0_2 import io

    class Toy(io.ComfyNode):
        TITLE = "Toy"
        ORDERED_INPUTS = (("start", "end"),)

        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="Test_Toy",
                inputs=[
                    io.Float.Input("rate", default=1e-4),
                    io.Float.Input("start", default=0.0),
                    io.Float.Input("end", default=1.0),
                    io.Float.Input("bare", optional=True),
                    io.Int.Input("count", default=1),
                ],
                outputs=[],
            )

        @classmethod
        def execute(cls, **values):
            with errors.node_errors(cls.TITLE):
                errors.check_number_inputs(cls, values)
            return io.NodeOutput()

    return Toy


FINE = {"rate": 0.5, "start": 0.2, "end": 0.8, "count": 3}


def test_node_errors_adds_the_title_and_hint_once_and_lets_bugs_through(errors):
    from prefpersonalize.pure.errors import InputError

    with pytest.raises(errors.NodeInputError, match=r"^Toy: bad size; fix it\. Try 64$"):
        with errors.node_errors("Toy"), errors.node_errors("Toy", hint="Try 64"):
            raise InputError("bad size; fix it.")
    with pytest.raises(KeyError):
        with errors.node_errors("Toy"):
            raise KeyError("a bug")


def test_finite_and_ordered_numbers_pass(toy):
    toy.execute(**FINE)
    toy.execute(**{**FINE, "start": 0.5, "end": 0.5})  # equal is ordered
    toy.execute(rate=2, start=0, end=1)  # a linked INT in a FLOAT input; optional inputs left out
    toy.execute(**{**FINE, "rate": None})  # not a number: not this check's business


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "Toy: rate is NaN; set a finite number (default 0.0001)."),
        (math.inf, "Toy: rate is infinite; set a finite number (default 0.0001)."),
        (-math.inf, "Toy: rate is infinite; set a finite number (default 0.0001)."),
    ],
)
def test_nan_and_infinity_are_refused_with_the_default(toy, errors, value, message):
    with pytest.raises(errors.NodeInputError) as caught:
        toy.execute(**{**FINE, "rate": value})
    assert str(caught.value) == message


def test_an_input_without_default_and_an_unordered_pair(toy, errors):
    with pytest.raises(errors.NodeInputError, match=r"^Toy: bare is NaN; set a finite number\.$"):
        toy.execute(**FINE, bare=math.nan)
    with pytest.raises(errors.NodeInputError, match=r"^Toy: start 0\.8 is after end 0\.2; swap them\.$"):
        toy.execute(**{**FINE, "start": 0.8, "end": 0.2})
    with pytest.raises(errors.NodeInputError, match="end is NaN"):  # NaN first: it compares as ordered
        toy.execute(**{**FINE, "end": math.nan})


def float_inputs(node) -> list:
    from comfy_api.v0_0_2 import io

    return [item for item in node.define_schema().inputs if isinstance(item, io.Float.Input)]


def all_nodes():
    from prefpersonalize.nodes import NODE_LIST

    return NODE_LIST


def test_every_node_with_numbers_checks_them_first(errors):
    """Each FLOAT input of each node, NaN, everything else at its default and every socket None:
    the node refuses it with its title before it touches any other input."""
    checked = 0
    for node in all_nodes():
        inputs = node.define_schema().inputs
        names = {item.id for item in inputs}
        for pair in getattr(node, "ORDERED_INPUTS", ()):
            assert set(pair) <= names, f"{node.__name__}.ORDERED_INPUTS names {pair}, not all inputs"
        if not float_inputs(node) and not hasattr(node, "ORDERED_INPUTS"):
            continue
        assert "check_number_inputs(cls, " in inspect.getsource(node.execute), node.__name__
        defaults = {item.id: getattr(item, "default", None) for item in inputs}
        for item in float_inputs(node):
            with pytest.raises(errors.NodeInputError) as caught:
                node.execute(**{**defaults, item.id: math.nan})
            assert str(caught.value).startswith(f"{node.TITLE}: {item.id} is NaN; set a finite number")
            checked += 1
        for first, second in getattr(node, "ORDERED_INPUTS", ()):
            with pytest.raises(errors.NodeInputError, match=f"^{node.TITLE}: {first} 1 is after {second} 0; swap"):
                node.execute(**{**defaults, first: 1.0, second: 0.0})
    assert checked >= 28  # the trainer and the job export (7 each), focus 5, joint 6, and 3 more
