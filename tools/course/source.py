"""Editing functions in Python source by their qualified names ('patchify', 'M2D.predict'): a stub keeps the
signature and the docstring and raises NotImplementedError; a transplant puts another function's whole text in
a function's place. The handout stubs the assignments' functions; the grader transplants."""
import ast
import textwrap


def find(src, qualname):
    """The FunctionDef node of `qualname` in `src` (module-level function or method)."""
    scope = ast.parse(src).body
    *outer, name = qualname.split('.')
    for part in outer:
        scope = next(n for n in scope if isinstance(n, ast.ClassDef) and n.name == part).body
    for node in scope:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise KeyError(f"no function {qualname!r}")


def span(node):
    """(first line, last line) of a function with its decorators, 1-based, inclusive."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return first, node.end_lineno


def text(src, qualname):
    """The whole text of a function (decorators included), dedented."""
    first, last = span(find(src, qualname))
    return textwrap.dedent('\n'.join(src.splitlines()[first - 1:last])) + '\n'


def solution_lines(src, qualname):
    """The statements of the function's body that are its own: each line that is a whole statement of 20
    characters or more, not a comment, and not already in its docstring (a convention stated there)."""
    node = find(src, qualname)
    doc = docstring_node(node)
    body = node.body[1:] if doc else node.body
    if not body:
        return []
    lines = [line.strip() for line in src.splitlines()[body[0].lineno - 1:node.end_lineno]]
    return [line for line in lines if len(line) >= 20 and not line.startswith('#') and parses(line)
            and line not in (doc.value.value if doc else '')]


def parses(line):
    try:
        ast.parse(line)
        return True
    except SyntaxError:
        return False


def docstring_node(node):
    first = node.body[0]
    is_str = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return first if is_str and isinstance(first.value.value, str) else None


def stub(src, qualname, message):
    """`src` with the body of `qualname` replaced by `raise NotImplementedError(message)` after its docstring."""
    node = find(src, qualname)
    lines = src.splitlines()
    indent = ' ' * node.body[0].col_offset
    doc = docstring_node(node)
    keep = doc.end_lineno if doc else node.body[0].lineno - 1
    new = lines[:keep] + [f'{indent}raise NotImplementedError({message!r})'] + lines[node.end_lineno:]
    return '\n'.join(new) + ('\n' if src.endswith('\n') else '')


def transplant(src, qualname, function_text):
    """`src` with the whole function `qualname` replaced by `function_text` (a complete definition, any
    indentation; re-indented to the function's place)."""
    node = find(src, qualname)
    first, last = span(node)
    lines = src.splitlines()
    indent = ' ' * node.col_offset
    new = textwrap.indent(textwrap.dedent(function_text).strip('\n'), indent).splitlines()
    out = '\n'.join(lines[:first - 1] + new + lines[last:]) + ('\n' if src.endswith('\n') else '')
    ast.parse(out)  # a transplant that breaks the file is an error here, not in the grader's run
    return out
