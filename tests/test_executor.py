"""The Executor API: ``@requests`` binding, creation, loading by ``--uses``, and arrays over the wire."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shardnet import ConfigurationError, DataRequest, Document, Executor, requests
from shardnet.networking import oneshot
from shardnet.protocol import ndarray
from shardnet.protocol.proto import docarray_pb2
from shardnet.manifests.kubernetes import DeploymentSpec
from shardnet.runtimes.deployment import Deployment
from shardnet.runtimes.executor import executor_reference, handler_table, load_executor_class, split_uses
from shardnet.runtimes.worker import Worker

import executors


# -- @requests --------------------------------------------------------------------------------


def test_requests_binds_one_endpoint_a_list_and_the_default():
    class Service(Executor):
        @requests(on="/index")
        def index(self, docs, parameters, **kwargs): ...

        @requests(on=["/search", "/find"])
        def search(self, docs, parameters, **kwargs): ...

        @requests
        def rest(self, docs, parameters, **kwargs): ...

    table = Service.handler_table()
    assert {endpoint: handler.name for endpoint, handler in table.items()} == {
        "/index": "index",
        "/search": "search",
        "/find": "search",
        "*": "rest",
    }


def test_a_class_binding_the_default_both_bare_and_by_name_keeps_the_later_as_jina_does(caplog):
    """It was refused as a default bound twice once "/default" by name was the default (found by a review):
    Jina loads such a class, and the later binding takes the default."""

    class Both(Executor):
        @requests
        def catch_all(self, docs, **kwargs): ...

        @requests(on="/default")
        def default(self, docs, **kwargs): ...

    assert Both.handler_table()["*"].name == "default"
    assert "binds the default handler twice" in caplog.text


def test_two_bare_requests_in_one_class_are_still_refused():
    class Twice(Executor):
        @requests
        def first(self, docs, **kwargs): ...

        @requests
        def second(self, docs, **kwargs): ...

    with pytest.raises(ConfigurationError, match="Twice binds the default handler twice: first and second"):
        Twice.handler_table()


def test_stacked_requests_decorators_bind_every_endpoint():
    assert {endpoint: handler.name for endpoint, handler in executors.Minimal.handler_table().items()} == {
        "/reverse": "reverse",
        "/a": "both",
        "/b": "both",
    }


def test_subclass_binding_overrides_the_parents():
    class Parent(Executor):
        @requests(on="/x")
        def old(self, docs, parameters, **kwargs): ...

    class Child(Parent):
        @requests(on="/x")
        def new(self, docs, parameters, **kwargs): ...

    assert Child.handler_table()["/x"].name == "new" and Parent.handler_table()["/x"].name == "old"


def test_endpoint_must_start_with_a_slash():
    with pytest.raises(ConfigurationError, match="must start with '/'"):

        class Bad(Executor):
            @requests(on="index")
            def index(self, docs, parameters, **kwargs): ...


@pytest.mark.parametrize(
    "on, message",
    [(123, "an endpoint is a string like '/index', got 123"), ([], "binds no endpoint"), (["/a", None], "got None")],
)
def test_requests_refuses_what_is_no_endpoint(on, message):
    with pytest.raises(ConfigurationError, match=re.escape(message)):

        class Wrong(Executor):
            @requests(on=on)
            def handle(self, docs, parameters, **kwargs):
                return None


def test_one_class_may_not_bind_an_endpoint_twice_and_create_says_so_before_init():
    class Twice(Executor):
        def __init__(self, **kwargs):
            raise AssertionError("__init__ must not run for a class that cannot be served")

        @requests(on="/x")
        def first(self, docs, parameters, **kwargs):
            return None

        @requests(on=["/y", "/x"])
        def second(self, docs, parameters, **kwargs):
            return None

    with pytest.raises(ConfigurationError, match="Twice binds /x twice: first and second"):
        Twice.create()


def test_create_sets_runtime_args_before_init_and_passes_uses_with():
    seen = {}

    class Sharded(Executor):
        def __init__(self, greeting: str = "hi", **kwargs):
            super().__init__(**kwargs)
            seen["shard"] = self.runtime_args.shard_id
            seen["greeting"] = greeting

    executor = Sharded.create({"shard_id": 3, "workspace": "/tmp/w"}, greeting="hello")
    assert seen == {"shard": 3, "greeting": "hello"}
    assert executor.runtime_args.workspace == "/tmp/w" and executor.runtime_args.name == "Sharded"
    with pytest.raises(ConfigurationError, match="unexpected arguments: colour"):
        executors.KnownOnly.create(colour="red")


def test_a_jina_init_handing_its_arguments_up_is_served_and_jinas_own_arguments_are_ignored():
    """``super().__init__(*args, **kwargs)`` then ``kwargs.get(...)`` is how many Jina Executors read uses_with;
    it failed with "unexpected arguments" (found by a review)."""

    class ReadsKwargs(Executor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.given = kwargs.get("given")

    assert ReadsKwargs.create(given="yes", workspace="/elsewhere", metas={"name": "x"}).given == "yes"
    with pytest.raises(ConfigurationError, match="takes keyword arguments only"):
        ReadsKwargs("positional")


def test_an_executor_made_directly_has_what_a_worker_gives_it(tmp_path, monkeypatch):
    """Made in a test or a notebook, it had no runtime_args, so metas, workspace and logger raised (a review)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    class Encoder(Executor):
        def __init__(self, dim: int = 4, **kwargs):
            super().__init__(**kwargs)
            self.dim = dim

        @requests
        def encode(self, docs, **kwargs):
            self.logger.success("encoded %d", len(docs))

    encoder = Encoder(dim=8)
    assert encoder.dim == 8 and encoder.runtime_args.shard_id == 0 and encoder.metas.name == "Encoder"
    assert encoder.workspace == str(tmp_path / "cache" / "shardnet" / "Encoder" / "0")  # Jina: ~/.cache/jina/...
    assert os.path.isdir(encoder.workspace)
    encoder.encode([Document()])  # its logger has Jina's success
    # Jina's own arguments, handed up, count as in Jina (they were dropped, and the cache folder used: a review)
    assert Encoder(workspace=str(tmp_path / "given")).workspace == str(tmp_path / "given" / "Encoder" / "0")
    named = Encoder(metas={"name": "enc", "workspace": str(tmp_path / "m")}, runtime_args={"shard_id": 2})
    assert named.workspace == str(tmp_path / "m" / "enc" / "2")
    with pytest.raises(ConfigurationError, match="requests=: bind endpoints with @requests"):
        Encoder(requests={"/x": "encode"})


def test_metas_and_logger_are_an_executors_own_to_change_as_in_jina(tmp_path, monkeypatch):
    class OwnLogger(Executor):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.logger = logging.getLogger("mine")  # a plain attribute in Jina: it failed to start (a review)
            self.metas.description = "kept"  # a fresh namespace each time lost it

    monkeypatch.chdir(tmp_path)
    executor = OwnLogger.create({"workspace": "relative-root"})
    assert executor.logger.name == "mine" and executor.metas.description == "kept"
    # an absolute path, as Jina's, whatever the root was given as (a relative one was handed on as it was)
    assert executor.workspace == str(tmp_path / "relative-root" / "OwnLogger" / "0")


# -- loading by --uses ----------------------------------------------------------------------------


def test_a_class_no_worker_could_import_is_refused_where_it_is_named():
    def make():
        class Local(Executor):
            @requests
            def handle(self, docs, **kwargs):
                return None

        return Local

    with pytest.raises(ConfigurationError, match="defined inside a function"):
        executor_reference(make())
    session = subprocess.run(  # python -c: __main__ has no file a worker could load
        [sys.executable, "-c", "from shardnet import Executor, requests\n"
         "from shardnet.runtimes.executor import executor_reference\n"
         "class U(Executor):\n    @requests\n    def f(self, docs, **kw): pass\n"
         "executor_reference(U)"],
        capture_output=True, text=True, timeout=60,
    )
    assert session.returncode != 0 and "no file behind it" in session.stderr, session.stderr


def test_a_file_that_fails_to_load_leaves_no_half_module_behind(tmp_path):
    broken = tmp_path / "broken_executor.py"
    broken.write_text("def oops(:\n")
    with pytest.raises(ConfigurationError, match=r"broken_executor.py, line 1: invalid syntax"):
        load_executor_class(f"{broken}:Broken")
    assert "shardnet_user_broken_executor" not in sys.modules


def test_an_import_failing_inside_the_users_file_names_its_line(tmp_path):
    nested = tmp_path / "nested_import.py"
    nested.write_text("import os\nimport no_such_module_xyz\n")
    with pytest.raises(ConfigurationError) as refused:
        load_executor_class(f"{nested}:X")
    assert str(refused.value).endswith(f"No module named 'no_such_module_xyz' ({nested}, line 2)")


def test_a_jina_executor_file_is_named_as_one(tmp_path):
    jina_style = tmp_path / "jina_executor.py"
    jina_style.write_text("from jina import Executor, requests\n\nclass Probe(Executor):\n    pass\n")
    with pytest.raises(ConfigurationError) as refused:
        load_executor_class(f"{jina_style}:Probe")
    assert "No module named 'jina'" in str(refused.value) and "it looks like a Jina Executor" in str(refused.value)
    assert "from shardnet import Executor, requests" in str(refused.value)


def test_load_executor_class_by_module_and_by_file_path():
    assert load_executor_class("shardnet.examples.text_index:TextIndexer").__name__ == "TextIndexer"
    loaded = load_executor_class(f"{executors.__file__}:Tagger")
    assert loaded.__name__ == "Tagger" and issubclass(loaded, Executor)


@pytest.mark.parametrize("uses", ["config.yml", "jinahub://Encoder", "pkg/mod:Cls", "m:C:extra", "m:", ":C", "m:C D"])
def test_the_worker_a_deployment_and_the_manifests_refuse_the_same_uses_alike(uses):
    """One rule (split_uses) for every place an Executor is named by text: what one refuses, all refuse."""
    refusals = []
    for name_it in (load_executor_class, Deployment, lambda text: DeploymentSpec(name="idx", image="i", uses=text)):
        with pytest.raises(ConfigurationError, match="must look like MODULE:CLASS or FILE.py:CLASS") as refused:
            name_it(uses)
        refusals.append(str(refused.value).split(" ", 1)[1])  # past the "uses"/"--uses" that names the option
    assert len(set(refusals)) == 1, refusals


def test_uses_takes_every_reference_a_deployment_may_write():
    """executor_reference writes a script's absolute path: spaces, colons and non-ASCII names included."""
    assert split_uses("/home/me/My Projects/upper.py:Upper") == ("/home/me/My Projects/upper.py", "Upper")
    assert split_uses("/srv/a:b/exec.py:Cls") == ("/srv/a:b/exec.py", "Cls")
    assert split_uses(r"C:\work\exec.py:Cls") == (r"C:\work\exec.py", "Cls")
    assert split_uses("pkg.mod:Outer.Inner") == ("pkg.mod", "Outer.Inner")
    assert split_uses("módulo:Größe") == ("módulo", "Größe")


def test_a_class_with_a_non_ascii_name_in_a_script_loads_from_its_reference(tmp_path):
    script = tmp_path / "a:b" / "größen.py"
    script.parent.mkdir()
    script.write_text("from shardnet import Executor\n\nclass Größe(Executor):\n    pass\n", encoding="utf-8")
    loaded = load_executor_class(f"{script}:Größe")
    assert loaded.__name__ == "Größe" and issubclass(loaded, Executor)


@pytest.mark.parametrize(
    "uses, message",
    [
        ("no_colon", "must look like MODULE:CLASS"),
        ("missing_module_abc:X", "cannot import 'missing_module_abc'"),
        ("/nonexistent/file.py:X", "no such file"),
        (f"{executors.__file__}:Nope", "has no 'Nope'"),
        ("json:JSONDecoder", "is not a shardnet.Executor subclass"),
    ],
)
def test_load_executor_class_errors_name_the_problem(uses, message):
    with pytest.raises(ConfigurationError, match=message):
        load_executor_class(uses)


# -- handler signatures, served ------------------------------------------------------------------


async def test_minimal_signatures_and_returned_views_are_served(runtimes):
    worker = await runtimes(Worker(executors.Minimal.create()))
    address = worker.server.address
    reversed_ = await oneshot.send_request_async(
        DataRequest([Document(id=str(i)) for i in range(3)], endpoint="/reverse"), address, timeout=10
    )
    assert not reversed_.is_error, reversed_.status.description
    assert reversed_.docs.ids == ["2", "1", "0"]
    for endpoint in ("/a", "/b"):
        response = await oneshot.send_request_async(DataRequest([Document()], endpoint=endpoint), address, timeout=10)
        assert response.docs.texts == [endpoint]


class ForwardsItsKwargs(Executor):
    """Hands its **kwargs on to code written for Jina's handler keywords, as ported Executors do."""

    @requests(on="/forward")
    def forward(self, docs, parameters, **kwargs):
        def jinas_keywords_only(docs_matrix=None, docs_map=None, tracing_context=None):
            return len(docs_matrix or [])

        for doc in docs:
            doc.tags["columns"] = jinas_keywords_only(**kwargs)


async def test_a_handler_is_given_jinas_keywords_alone_unless_it_names_endpoint(runtimes):
    """A handler taking **kwargs was given ``endpoint`` too, which Jina never passes: one that forwarded its
    kwargs to code written for Jina's failed on every request (found by a review). A handler naming it gets it."""
    worker = await runtimes(Worker(ForwardsItsKwargs.create()))
    response = await oneshot.send_request_async(
        DataRequest([Document()], endpoint="/forward"), worker.server.address, timeout=10
    )
    assert not response.is_error, response.status.description
    assert response.docs[0].tags["columns"] == 1
    named = await runtimes(Worker(executors.Tagger.create()))
    response = await oneshot.send_request_async(DataRequest([Document()], endpoint="/endpoint"), named.server.address,
                                                timeout=10)
    assert response.docs[0].tags["endpoint"] == "/endpoint"


# -- arrays -------------------------------------------------------------------------------------------


async def test_dense_and_sparse_arrays_cross_the_wire_through_a_handler(runtimes):
    worker = await runtimes(Worker(executors.Arrays.create()))
    embedding = np.array([3.0, -4.0, 0.0], dtype=np.float32)
    response = await oneshot.send_request_async(
        DataRequest([Document(embedding=embedding)], endpoint="/normalize"), worker.server.address, timeout=10
    )
    assert not response.is_error, response.status.description
    [doc] = response.docs
    np.testing.assert_allclose(doc.embedding, [0.6, -0.8, 0.0], rtol=1e-6)
    assert doc.embedding.dtype == np.float32
    assert doc.proto.tensor.WhichOneof("content") == "sparse"
    np.testing.assert_array_equal(doc.tensor, [0.0, 5.0, 0.0])


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.one_of(hnp.integer_dtypes(endianness="="), hnp.floating_dtypes(endianness="<"), hnp.boolean_dtypes()),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    st.booleans(),
)
def test_dense_round_trip_keeps_values_shape_and_dtype(array, transpose):
    if transpose:
        array = array.T  # not C-contiguous: the helper must copy, not send raw memory
    message = docarray_pb2.NdArrayProto()
    ndarray.to_proto(array, message)
    back = ndarray.from_proto(docarray_pb2.NdArrayProto.FromString(message.SerializeToString()))
    assert back.shape == array.shape and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=3).flatmap(
        lambda shape: st.tuples(
            st.just(tuple(shape)),
            st.lists(st.tuples(*(st.integers(0, side - 1) for side in shape)), unique=True, max_size=8),
        )
    ),
    st.sampled_from([np.float32, np.float64, np.int64]),
)
def test_sparse_round_trip_densifies_to_the_same_array(shape_and_positions, dtype):
    shape, positions = shape_and_positions
    values = np.arange(1, len(positions) + 1, dtype=dtype)
    indices = np.array(positions, dtype=np.int64).reshape(len(positions), len(shape))
    message = docarray_pb2.NdArrayProto()
    ndarray.write_sparse(indices, values, shape, message)
    back = ndarray.from_proto(docarray_pb2.NdArrayProto.FromString(message.SerializeToString()))
    expected = np.zeros(shape, dtype=dtype)
    for position, value in zip(positions, values, strict=True):
        expected[position] = value
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, expected)


def test_object_arrays_are_refused():
    with pytest.raises(Exception, match="only numbers, strings, bytes, datetimes and timedeltas travel"):
        ndarray.to_proto(np.array([{"a": 1}], dtype=object), docarray_pb2.NdArrayProto())


# -- found by the Executor API review (a Jina user porting Executors) ---------------------------------


def test_a_handler_named_create_is_served_and_does_not_hide_how_the_worker_makes_the_executor(tmp_path):
    """A CRUD Executor's ``@requests(on="/create") def create(...)`` hid the classmethod the worker made every
    Executor with: the worker died saying "the Executor's __init__ (Crud) raised TypeError: Crud.create() missing
    1 required positional argument: 'docs'", though no __init__ had run."""
    from shardnet.runtimes.executor import create_executor, handler_table

    class Crud(Executor):
        @requests(on="/create")
        def create(self, docs, **kwargs):
            for doc in docs:
                doc.text = "created"

        @requests(on="/handler_table")
        def handler_table(self, docs, **kwargs): ...

    executor = create_executor(Crud, {"shard_id": 1, "shards": 2})
    assert executor.runtime_args.shard_id == 1
    assert sorted(handler_table(Crud)) == ["/create", "/handler_table"]
    file = tmp_path / "crud.py"
    file.write_text(
        "from shardnet import Executor, requests\n"
        "class Crud(Executor):\n"
        "    @requests(on='/create')\n"
        "    def create(self, docs, **kwargs):\n"
        "        for doc in docs:\n"
        "            doc.text = 'created'\n"
    )
    with Deployment(uses=f"{file}:Crud") as dep:
        assert dep.post("/create", [Document(text="x")])[0].text == "created"


@pytest.mark.parametrize(
    "signature, missing",
    [
        ("self, doc, **kwargs", "'doc'"),  # docs, misspelt
        ("self, docs, params", "'params'"),
        ("self, docs, previous_parameters, **kwargs", "'previous_parameters'"),
        ("self, docs, *, top_k, **kwargs", "'top_k'"),
    ],
)
def test_a_handler_requiring_an_argument_no_request_gives_is_refused_as_its_class_loads(signature, missing):
    """Such a handler was loaded and failed every request with a TypeError (Jina refuses a handler without
    **kwargs that lacks its arguments as the class is defined)."""
    namespace: dict = {}
    exec(f"def handler({signature}): ...", namespace)

    class Wrong(Executor):
        handler = requests(on="/x")(namespace["handler"])

    with pytest.raises(ConfigurationError, match=f"handler handler requires {missing}, which no request gives"):
        Wrong.handler_table()


def test_handlers_naming_only_what_requests_give_or_defaulting_the_rest_are_taken():
    class Fine(Executor):
        @requests(on="/a")
        def a(self, docs): ...

        @requests(on="/b")
        def b(self, docs, parameters, docs_matrix, docs_map, tracing_context, endpoint): ...

        @requests(on="/c")
        def c(self, docs, top_k=3, *, model=None): ...

        @requests(on="/d")
        async def d(self, *args, **kwargs): ...

    assert sorted(Fine.handler_table()) == ["/a", "/b", "/c", "/d"]


def test_an_async_generator_handler_is_refused_as_its_class_loads():
    """It was loaded and every request answered ERROR "handler agen returned async_generator" (Jina refuses it
    as the class is defined)."""

    class Streams(Executor):
        @requests(on="/x")
        async def agen(self, docs, **kwargs):
            for doc in docs:
                yield doc

    with pytest.raises(ConfigurationError, match="handler .*agen is an async generator"):
        Streams.handler_table()


def test_a_wraps_decorator_that_supplies_an_argument_is_not_refused():
    """A decorator (functools.wraps) giving the handler an argument of its own: inspect.signature follows
    __wrapped__ and saw the inner function's required `model`; Jina (getfullargspec, the wrapper's own
    signature) loads the class, and shardnet served it before 0c328d9."""

    def with_model(f):
        @functools.wraps(f)
        def wrapper(self, docs, **kwargs):
            return f(self, docs, model="m", **kwargs)

        return wrapper

    class Ranker(Executor):
        @requests(on="/rank")
        @with_model
        def rank(self, docs, model, **kwargs):
            for doc in docs:
                doc.text = model

    assert sorted(handler_table(Ranker)) == ["/rank"]


def _with_limit(f):
    """A decorator supplying what the handler needs from the request's parameters (its own signature names them)."""

    @functools.wraps(f)
    def wrapper(self, docs, parameters, **kwargs):
        return f(self, docs, limit=int(parameters.get("limit", 1)))

    return wrapper


def _timed(f):
    """A decorator passing everything on (a timing one, say)."""

    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return f(self, *args, **kwargs)

    return wrapper


def _served_first_of_two(executor_class) -> list[str]:
    """The texts of two documents after ``executor_class``'s /x handler ran on them with ``limit`` 1."""
    handler = handler_table(executor_class)["/x"]
    docs = [Document(text="a"), Document(text="b")]
    arguments = dict(docs=docs, parameters={"limit": 1}, docs_matrix=None, docs_map=None, tracing_context=None)
    asyncio.run(handler(executor_class(), None, **arguments))
    return [doc.text for doc in docs]


def test_a_wraps_decorator_requiring_an_argument_the_inner_function_does_not_name_is_given_it():
    """A wrapper of its own signature (self, docs, parameters, **kwargs) over a function naming docs and an
    argument the wrapper supplies: the class loaded (its own signature is checked), but only what the inner
    function names was passed, and every request failed with "missing ... 'parameters'"."""

    class Limited(Executor):
        @requests(on="/x")
        @_with_limit
        def first(self, docs, limit):
            for doc in docs[:limit]:
                doc.text = "seen"

    assert _served_first_of_two(Limited) == ["seen", "b"]


@pytest.mark.parametrize("kind", [staticmethod, classmethod])
@pytest.mark.parametrize("outermost", ["requests", "the method kind"])
def test_a_static_or_class_method_handler_is_refused_as_its_class_loads(kind, outermost):
    """@requests over @staticmethod loaded and failed every request ("multiple values for argument 'docs'"); over
    @classmethod the load failed with a bare TypeError (a regression review). @staticmethod over @requests left the
    endpoint unbound without a word."""

    def rank(*args, **kwargs):
        return None

    class Ranker(Executor):
        if outermost == "requests":
            on_rank = requests(on="/rank")(kind(rank))
        else:
            on_rank = kind(requests(on="/rank")(rank))

    with pytest.raises(ConfigurationError, match=f"handler .*rank is a {kind.__name__}: a handler is a plain method"):
        handler_table(Ranker)


def test_two_stacked_wraps_decorators_are_given_what_the_middle_one_names():
    """Only the outermost and innermost signatures were read: what a middle decorator names was never passed, and
    every request failed (a regression review)."""

    class Limited(Executor):
        @requests(on="/x")
        @_timed
        @_with_limit
        def first(self, docs, limit):
            for doc in docs[:limit]:
                doc.text = "seen"

    assert _served_first_of_two(Limited) == ["seen", "b"]


def test_a_wrapper_without_kwargs_over_a_function_with_kwargs():
    """A wrapper naming its arguments, over a function taking **kwargs, was given every keyword and failed every
    request on docs_matrix (a regression review)."""

    def plain(f):
        @functools.wraps(f)
        def wrapper(self, docs, parameters):
            return f(self, docs, parameters)

        return wrapper

    class Plain(Executor):
        @requests(on="/x")
        @plain
        def run(self, docs, parameters, **kwargs):
            for doc in docs:
                doc.text = "seen"

    assert _served_first_of_two(Plain) == ["seen", "seen"]
