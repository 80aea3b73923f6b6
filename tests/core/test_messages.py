"""The public dataclasses whose generated methods are written out behave as ``dataclass`` would make them.

``ServiceRequest``, ``ServiceResponse``, ``ServiceAddress`` and ``Setting``
write out ``__init__``, ``__repr__``, ``__eq__`` (and, frozen, ``__hash__``)
instead of having ``dataclass`` compile them at import (see
``kservice._messages.FACTORY``). Each is compared here with a reference class
that ``dataclass`` itself makes from the same fields and options, so a field
added without its line in those methods fails.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import pytest
from kservice import ServiceAddress, ServiceRequest, ServiceResponse, Setting

#: class, the options it is declared with, its required arguments, another value for every field
CASES: list[tuple[type, dict[str, bool], tuple[Any, ...], dict[str, Any]]] = [
    (
        ServiceRequest,
        {"slots": True},
        ("id-1", "svc", "get"),
        {
            "request_id": "id-2",
            "service_name": "other",
            "method_name": "put",
            "args": (1, "a"),
            "kwargs": {"a": 1},
            "response_queue_name": "rsp.1",
            "deadline": 12.5,
            "metadata": {"trace": "t"},
        },
    ),
    (
        ServiceResponse,
        {"slots": True},
        (True,),
        {
            "success": False,
            "result": [1, 2],
            "error": "boom",
            "request_id": "id-9",
            "error_type": "ValueError",
            "error_origin": "service",
            "remote_traceback": "Traceback ...",
            "metadata": {"kservice.may_have_run": False},
            "degraded": True,
            "exception": ValueError("boom"),
        },
    ),
    (
        ServiceAddress,
        {"frozen": True},
        ("mmap", "svc", "svc.queue"),
        {
            "transport": "ray",
            "service_name": "other",
            "target": ("actor", 1),
            "instance": "replica-1",
            "info": {"pid": 1},
        },
    ),
    (
        Setting,
        {"frozen": True},
        ((int,), 3, "How many."),
        {
            "types": (float,),
            "default": 4.0,
            "doc": "Seconds.",
            "choices": (1, 2),
            "nullable": True,
            "minimum": 0,
            "maximum": 9,
        },
    ),
]
IDS = [case[0].__name__ for case in CASES]


def reference(cls: type, options: dict[str, bool]) -> type:
    """The class ``dataclass`` makes from ``cls``'s fields and ``options`` (its methods generated)."""
    specs = []
    for f in dataclasses.fields(cls):
        default: dict[str, Any] = (
            {"default_factory": f.default_factory}
            if f.default_factory is not dataclasses.MISSING
            else {"default": f.default}
            if f.default is not dataclasses.MISSING
            else {}
        )
        specs.append((f.name, f.type, dataclasses.field(repr=f.repr, compare=f.compare, hash=f.hash, **default)))
    namespace = {"__post_init__": cls.__post_init__} if hasattr(cls, "__post_init__") else {}
    made: type = dataclasses.make_dataclass(cls.__name__, specs, namespace=namespace, **options)
    made.__qualname__ = cls.__qualname__
    return made


@pytest.mark.parametrize(("cls", "options", "required", "others"), CASES, ids=IDS)
def test_the_methods_are_written_out_not_generated_at_import(
    cls: type, options: dict[str, bool], required: tuple[Any, ...], others: dict[str, Any]
) -> None:
    names = ["__init__", "__repr__", "__eq__"] + (["__hash__"] if options.get("frozen") else [])
    for name in names:
        method = vars(cls)[name]
        # The function itself, and the one a repr guard wraps: dataclass's are compiled from "<string>".
        functions = [
            method,
            *(c.cell_contents for c in method.__closure__ or () if inspect.isfunction(c.cell_contents)),
        ]
        assert inspect.getfile(cls) in {f.__code__.co_filename for f in functions}, name


@pytest.mark.parametrize(("cls", "options", "required", "others"), CASES, ids=IDS)
def test_a_written_out_dataclass_behaves_as_dataclass_makes_it(
    cls: type, options: dict[str, bool], required: tuple[Any, ...], others: dict[str, Any]
) -> None:
    ref = reference(cls, options)
    assert dataclasses.is_dataclass(cls)
    assert [f.name for f in dataclasses.fields(cls)] == list(others)
    # The parameters (dataclass's __init__ is annotated ``-> None`` as an object, this one as a string).
    assert str(inspect.signature(cls).parameters) == str(inspect.signature(ref).parameters)
    assert cls.__match_args__ == ref.__match_args__  # type: ignore[attr-defined]
    assert cls.__dataclass_params__.frozen == ref.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert ("__slots__" in vars(cls)) == ("__slots__" in vars(ref))
    assert (cls.__hash__ is None) == (ref.__hash__ is None)

    def both(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return cls(*args, **kwargs), ref(*args, **kwargs)

    # Defaults, including a fresh object from each factory, and an explicit None kept as given.
    mine, theirs = both(*required)
    assert repr(mine) == repr(theirs)
    for f in dataclasses.fields(cls):
        assert getattr(mine, f.name) == getattr(theirs, f.name), f.name
        if f.default_factory is not dataclasses.MISSING:
            assert getattr(mine, f.name) is not getattr(cls(*required), f.name), f.name
            kept, kept_ref = both(*required, **{f.name: None})
            assert getattr(kept, f.name) is None and getattr(kept_ref, f.name) is None
    # Every field given, positionally and by name.
    mine, theirs = both(*others.values())
    assert repr(mine) == repr(theirs)
    assert repr(cls(**others)) == repr(ref(**others))
    # Equality (and the hash) field by field: a field outside the comparison changes neither.
    base_args = dict(zip(others, required, strict=False))  # the required fields, by name
    for name, value in others.items():
        changed = {**base_args, name: value}
        a, ra = both(**base_args)
        b, rb = both(**changed)
        assert (a == b) == (ra == rb), name
        assert (a != b) == (ra != rb), name
        if options.get("frozen"):
            assert (hash(a) == hash(b)) == (hash(ra) == hash(rb)), name
            assert hash(a) == hash(ra)
    assert cls.__eq__(mine, theirs) is NotImplemented  # another class, even of the same fields
    assert (mine == copy.copy(mine)) and not (mine != copy.copy(mine))
    # Frozen or slotted, as declared.
    name = next(iter(others))
    for instance in both(*required):
        if options.get("frozen"):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(instance, name, others[name])
            with pytest.raises(dataclasses.FrozenInstanceError):
                delattr(instance, name)
        if options.get("slots"):
            with pytest.raises(AttributeError):
                instance.not_a_field = 1
    assert repr(dataclasses.replace(mine, **{name: others[name]})) == repr(
        dataclasses.replace(theirs, **{name: others[name]})
    )


def test_a_request_that_holds_itself_prints_as_dataclass_prints_it() -> None:
    ref = reference(ServiceRequest, {"slots": True})
    mine, theirs = ServiceRequest("id", "svc", "m"), ref("id", "svc", "m")
    mine.args, theirs.args = (mine,), (theirs,)
    assert repr(mine) == repr(theirs)
    assert "args=(...,)" in repr(mine)


def test_setting_folds_a_none_type_into_nullable_as_before() -> None:
    setting = Setting((str, type(None)), None, "A name.")
    assert setting.types == (str,) and setting.nullable
    assert setting == Setting((str,), None, "A name.", nullable=True)
    assert hash(setting) == hash(Setting((str,), None, "A name.", nullable=True))
