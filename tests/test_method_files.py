"""The blocks every method file carries by design are the same in all seven files.

Each file stays self-contained and copyable, so the layer plumbing, HF_TARGETS, dropout, find_targets,
merge / unmerge, the no-op hooks and the adapter's save / load are written out in each. Here each such block is read out of each
file by name (ast) and compared, the layer class's name read as `Layer`; a file whose copy drifted
from the others is named with the block.
"""
import ast
import collections
import difflib
import re
from pathlib import Path

import pytest

import methods

FILES = {name: Path(methods.__file__).parent / f"{name}.py" for name in methods.NAMES}
# blocks written out in every file; "Layer.f" is a method of the file's layer class
SHARED = ("HF_TARGETS", "dropout", "is_conv1d", "Layer.merge", "Layer.unmerge", "adaptable", "find_targets",
          "replace", "layers", "config", "check_step", "param_groups", "extra_loss", "after_backward",
          "after_step", "val_loss_steps", "can_merge", "merge", "save", "load")
# the statements that open (or close) a block whose rest is each method's own: (block, first n, last n)
SHARED_PARTS = (("Layer.__init__", 6, 2), ("Layer.forward", 2, 0), ("apply", 1, 0))
# the files whose block is their own by design: a hook the method needs, a merge it checks first
OWN = {"param_groups": {"sora", "adalora", "salora"}, "extra_loss": {"sora", "adalora", "salora"},
       "after_backward": {"sora", "adalora", "salora"}, "after_step": {"sora", "adalora", "alora", "salora"},
       "val_loss_steps": {"alora"}, "merge": {"mosara", "sora", "adalora", "salora"}, "can_merge": {"mosara"}}


def read_blocks(path):
    """{block name: its source} of a method file's top-level functions, classes and constants, and of
    its layer class's methods (as Layer.name); the layer class's name read as `Layer`."""
    src = path.read_text()
    tree = ast.parse(src)
    layer = next(n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Linear"))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node
            if node.name == layer:
                found.update({f"Layer.{m.name}": m for m in node.body if isinstance(m, ast.FunctionDef)})

    def text(node):
        return re.sub(rf"\b{layer}\b", "Layer", ast.get_source_segment(src, node, padded=True))
    blocks = {name: text(node) for name, node in found.items()}
    for name, first, last in SHARED_PARTS:
        body = [s for s in found[name].body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        blocks[f"{name} (first {first} statements)"] = "\n".join(text(s) for s in body[:first])
        if last:
            blocks[f"{name} (last {last} statements)"] = "\n".join(text(s) for s in body[-last:])
    return blocks


BLOCKS = {name: read_blocks(path) for name, path in FILES.items()}
CHECKED = [*SHARED, *(f"{n} (first {a} statements)" for n, a, _ in SHARED_PARTS),
           *(f"{n} (last {b} statements)" for n, _, b in SHARED_PARTS if b)]


@pytest.mark.parametrize("block", CHECKED)
def test_a_shared_block_is_the_same_in_every_method_file(block):
    copies = {name: BLOCKS[name].get(block) for name in FILES if name not in OWN.get(block.split(" ")[0], ())}
    missing = [f"methods/{name}.py" for name, text in copies.items() if text is None]
    assert not missing, f"{', '.join(missing)} lack{'s' if len(missing) == 1 else ''} the shared block {block}"
    majority, count = collections.Counter(copies.values()).most_common(1)[0]
    agree = [name for name, text in copies.items() if text == majority]
    for name, text in copies.items():
        if text != majority:
            diff = "\n".join(difflib.unified_diff(majority.splitlines(), text.splitlines(), f"methods/{agree[0]}.py",
                                                  f"methods/{name}.py", lineterm=""))
            pytest.fail(f"methods/{name}.py: {block} differs from its copy in {', '.join(agree)} "
                        f"({count} of {len(copies)} files):\n{diff}")


@pytest.mark.parametrize("block", sorted(OWN))
def test_a_block_listed_as_a_methods_own_differs_from_the_shared_one(block):
    """A file listed in OWN whose block is the shared copy after all is taken off the list."""
    shared = {BLOCKS[name][block] for name in FILES if name not in OWN[block]}
    same = [name for name in OWN[block] if BLOCKS[name][block] in shared]
    assert not same, f"{block} of {', '.join(same)} is the shared copy: remove it from OWN"
