"""Registration traps: options given to a class, malformed factories, ``__main__`` classes, tracebacks printed once."""

from __future__ import annotations

import pytest
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager

from tests.core.conftest import run_python
from tests.core.services import KeyValue


class Plain:
    """A constructor that takes one positional argument and no keyword it does not name."""

    def __init__(self, initial: dict[str, int] | None = None) -> None:
        self.data = dict(initial or {})

    def get(self, key: str) -> int | None:
        return self.data.get(key)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"kind": "process"}, "kind"),
        ({"replicas": 2}, "replicas"),
        ({"transports": ["mmap"]}, "transports"),
        ({"local": {"max_workers": 1}}, "local"),
    ],
)
def test_a_registration_option_given_with_a_class_says_to_use_a_factory(options: dict[str, object], named: str) -> None:
    env = ServiceEnvironment("e")
    with pytest.raises(TypeError) as raised:
        env.register_service("kv", Plain, {"a": 1}, **options)
    message = str(raised.value)
    assert f"keyword argument {named!r}" in message, message
    assert "is a registration option" in message, message
    # It shows the call to write instead, with this service's arguments.
    assert f"register_service('kv', ServiceFactory('kv', Plain, ({{'a': 1}},)), {named}=" in message, message
    assert env.service_names() == []  # nothing half-registered
    # The environment still works: the same service registered the right way serves calls.
    env.register_service("kv", ServiceFactory("kv", Plain, ({"a": 1},)), local={"max_workers": 1})
    with env, ServiceManager(env) as manager:
        assert manager.call_service_sync("kv", "get", ("a",)) == 1


def test_keywords_the_constructor_accepts_are_still_forwarded_verbatim() -> None:
    class TakesKind:
        def __init__(self, kind: str) -> None:
            self.kind = kind

        def what(self) -> str:
            return self.kind

    class TakesAnything:
        def __init__(self, **options: object) -> None:
            self.options = options

        def what(self) -> dict[str, object]:
            return self.options

    with ServiceEnvironment("e") as env, ServiceManager(env) as manager:
        env.register_service("k", TakesKind, kind="process")  # a constructor parameter, not an option
        env.register_service("a", TakesAnything, replicas=3)
        assert manager.call_service_sync("k", "what") == "process"
        assert manager.call_service_sync("a", "what") == {"replicas": 3}
        assert env.get_task("k").kind == "local"  # type: ignore[union-attr]


def test_a_keyword_that_is_no_option_keeps_the_constructors_own_error() -> None:
    env = ServiceEnvironment("e")
    env.register_service("kv", Plain, colour="red")  # rejected by the constructor at start, as before
    with pytest.raises(Exception, match="colour"):
        env.start()


def test_a_factory_checks_its_arguments() -> None:
    with pytest.raises(
        TypeError, match=r"args must be a tuple or list.*got dict.*args=\(\{'a': 1\},\).*kwargs=\{'a': 1\}"
    ):
        ServiceFactory("kv", KeyValue, {"a": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"args must be a tuple or list.*got str"):
        ServiceFactory("kv", KeyValue, "abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"kwargs must be a mapping.*got list"):
        ServiceFactory("kv", KeyValue, (), [("a", 1)])  # type: ignore[arg-type]
    listed = ServiceFactory("kv", KeyValue, [{"a": 1}])  # type: ignore[arg-type]
    assert listed.args == ({"a": 1},) and listed.create().get("a") == 1
    from types import MappingProxyType

    mapped = ServiceFactory("kv", Plain, (), MappingProxyType({"initial": {"b": 2}}))  # type: ignore[arg-type]
    assert mapped.kwargs == {"initial": {"b": 2}} and mapped.create().get("b") == 2


@pytest.mark.timeout(60)
def test_a_main_class_for_a_process_task_says_to_move_it_into_a_module() -> None:
    result = run_python(
        """
        from kservice import ServiceEnvironment, ServiceFactory

        class Inventory:
            def count(self):
                return 1

        env = ServiceEnvironment("e")
        try:
            env.register_service("inventory", ServiceFactory("inventory", Inventory), kind="process")
        except Exception as exc:
            print(type(exc).__name__, exc)
        # The same class in this process is fine.
        env.register_service("inventory", ServiceFactory("inventory", Inventory))
        with env:
            print(env.manager().call_service_sync("inventory", "count"))
        """
    )
    assert result.returncode == 0, result.stderr
    error, served = result.stdout.splitlines()
    assert error.startswith("ConfigError "), error
    assert "Inventory is defined in __main__" in error and "move it into a module" in error, error
    assert served == "1"


class OutOfStock(Exception):
    """Raised by the service below; importable by the caller."""


class Shop:
    def take(self, item: str, count: int) -> None:
        raise OutOfStock(f"only 3 {item} left")


def test_an_uncaught_remote_error_prints_its_traceback_once() -> None:
    import traceback

    with ServiceEnvironment("e") as env, ServiceManager(env) as manager:
        env.register_service("shop", Shop)
        with pytest.raises(OutOfStock) as raised:
            manager.call_service_sync("shop", "take", ("apple", 10))
    printed = "".join(traceback.format_exception(raised.value))
    assert printed.count('raise OutOfStock(f"only 3 {item} left")') == 1, printed
    assert raised.value.remote_traceback.count("raise OutOfStock") == 1  # type: ignore[attr-defined]
    assert "only 3 apple left" in printed
