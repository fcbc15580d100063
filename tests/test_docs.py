"""docs/api.md documents the whole public API, and the docs' Python examples parse.

What counts as public (the compatibility policy at the top of docs/api.md):

- every name in ``vizkit.__all__`` and in ``vizkit.kit.__all__``: each needs a heading
  ``### vizkit.NAME`` / ``### vizkit.kit.NAME`` (any level from ``##`` to ``######``);
- for every class that ``vizkit`` exports, the public names that vizkit itself defines
  on it (found through its MRO, so what comes from ``object``, ``ValueError``,
  ``IntEnum``... does not count; names starting with ``_`` never count). They come in
  two kinds, documented differently:

  * behaviour (methods, properties, class and static methods): each needs a heading
    ``#### vizkit.CLASS.NAME``, since each has a signature and semantics of its own;
  * data (dataclass fields, enum members, and the instance attributes a ModelGraph sets
    in ``__init__``): each must be named in backquotes (`` `name` ``) in the class's
    section (from its heading to the next heading of the same or a higher level),
    usually in its table of fields. A heading per field would bury the methods.

  ModelGraph's instance attributes (``model``, ``input_shape``, ``layers``) exist only
  on a traced graph, so the test traces the test kit's tiny model: that loads Keras.

And the other way round: every ``vizkit.…`` heading names something that exists, so a
rename cannot leave a stale entry behind.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import types
from pathlib import Path

import pytest

import vizkit
from vizkit import kit

REPO = Path(__file__).resolve().parents[1]
API = REPO / "docs" / "api.md"
DOCS_WITH_EXAMPLES = ["api.md", "plugins.md"]

HEADING = re.compile(r"^(#{2,6}) (vizkit(?:\.\w+)*)[ \t]*$", re.MULTILINE)
ANY_HEADING = re.compile(r"^(#{1,6}) ", re.MULTILINE)
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _api_text() -> str:
    assert API.is_file(), f"{API} is missing"
    return API.read_text(encoding="utf-8")


def _headings() -> dict[str, int]:
    """``vizkit.…`` heading → its level (2 for ``##``)."""
    return {match.group(2): len(match.group(1)) for match in HEADING.finditer(_api_text())}


def _section(name: str) -> str:
    """The text under heading ``name``, up to the next heading of the same or a higher level."""
    text = _api_text()
    match = next(m for m in HEADING.finditer(text) if m.group(2) == name)
    level = len(match.group(1))
    for following in ANY_HEADING.finditer(text, match.end()):
        if len(following.group(1)) <= level:
            return text[match.end() : following.start()]
    return text[match.end() :]


def _exported_classes() -> dict[str, type]:
    return {name: value for name in vizkit.__all__ if isinstance(value := getattr(vizkit, name), type)}


def _public_members(cls: type) -> tuple[set[str], set[str]]:
    """(data, behaviour): the public names vizkit defines on ``cls``, as the docstring says."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    enum_members = set(getattr(cls, "__members__", {}))
    data, behaviour = set(fields), set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("vizkit"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            if name in fields or name in enum_members:
                data.add(name)
            elif isinstance(value, (property, classmethod, staticmethod, types.FunctionType)):
                behaviour.add(name)
            else:  # a class-level constant
                data.add(name)
    return data, behaviour


# --------------------------------------------------------------------------- coverage


def test_every_name_vizkit_exports_has_a_heading():
    missing = [name for name in vizkit.__all__ if f"vizkit.{name}" not in _headings()]
    assert not missing, f"names in vizkit.__all__ without a '### vizkit.NAME' heading in docs/api.md: {missing}"


def test_every_name_of_vizkit_kit_has_a_heading():
    missing = [name for name in kit.__all__ if f"vizkit.kit.{name}" not in _headings()]
    assert not missing, f"names in vizkit.kit.__all__ without a '### vizkit.kit.NAME' heading in docs/api.md: {missing}"


def test_every_name_of_vizkit_featureviz_has_a_heading():
    from vizkit import featureviz

    missing = [name for name in featureviz.__all__ if f"vizkit.featureviz.{name}" not in _headings()]
    assert not missing, f"names in vizkit.featureviz.__all__ without a heading in docs/api.md: {missing}"


def test_the_public_classes_include_the_ones_plugin_authors_use():
    """The member tests below walk every exported class; these must be among them."""
    assert {"ModelGraph", "RunContext", "Technique", "Option", "Artifact", "Batch", "LayerInfo",
            "ModelLoader", "LoadedModel", "ReportSection", "ExitCode", "RunOptions"} <= set(_exported_classes())


@pytest.mark.parametrize("name", sorted(_exported_classes()))
def test_every_method_and_property_of_an_exported_class_has_a_heading(name):
    _, behaviour = _public_members(_exported_classes()[name])
    missing = sorted(member for member in behaviour if f"vizkit.{name}.{member}" not in _headings())
    assert not missing, f"public methods/properties of vizkit.{name} without a '#### vizkit.{name}.NAME' heading: {missing}"


@pytest.mark.parametrize("name", sorted(_exported_classes()))
def test_every_field_of_an_exported_class_is_named_in_its_section(name):
    data, _ = _public_members(_exported_classes()[name])
    section = _section(f"vizkit.{name}")
    missing = sorted(field for field in data if f"`{field}`" not in section)
    assert not missing, f"fields of vizkit.{name} not named (`name`) in its section of docs/api.md: {missing}"


def test_model_graph_instance_attributes_are_named_in_its_section(vizkit_model):
    graph = vizkit.ModelGraph.of(vizkit_model)
    attributes = {name for name in vars(graph) if not name.startswith("_")}
    assert {"model", "input_shape", "layers"} <= attributes
    section = _section("vizkit.ModelGraph")
    missing = sorted(name for name in attributes if f"`{name}`" not in section)
    assert not missing, f"attributes of a ModelGraph not named in its section of docs/api.md: {missing}"


def test_every_heading_names_something_that_exists():
    stale = []
    for name in _headings():
        value = vizkit
        for part in name.split(".")[1:]:
            try:
                value = getattr(value, part)
            except AttributeError:
                stale.append(name)
                break
    assert not stale, f"docs/api.md has headings for names that do not exist: {stale}"


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("doc", DOCS_WITH_EXAMPLES)
def test_every_python_code_block_parses(doc):
    path = REPO / "docs" / doc
    text = path.read_text(encoding="utf-8")
    blocks = [(text.count("\n", 0, match.start()) + 2, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]
    assert blocks, f"docs/{doc} has no ```python blocks"
    broken = []
    for line, code in blocks:
        try:
            ast.parse(code, filename=f"docs/{doc}:{line}")
        except SyntaxError as error:
            broken.append(f"docs/{doc}:{line + (error.lineno or 1) - 1}: {error.msg}")
    assert not broken, "python blocks that do not parse:\n" + "\n".join(broken)
