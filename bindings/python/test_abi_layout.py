#!/usr/bin/env python3
"""The ctypes twins of include/fep_kernels.h (bindings/python/fep_kernels/_abi.py) against the
header as a C compiler sees it. Needs neither the shared library nor PyTorch nor a GPU: only
``cc`` on PATH (``$CC`` if set).

For every ``ctypes.Structure`` class of ``_abi`` (``_FepSettleParams`` is the header's
``FepSettleParams``: the leading underscores are dropped) the test generates a small C program
that includes the header and prints ``sizeof``, ``_Alignof`` and, per field, ``offsetof``, the
field's size and its C type, compiles it with ``cc -std=c11 -Wall -Werror`` and compares every
number with ctypes (``ctypes.sizeof``, ``ctypes.alignment``, ``<Class>.<field>.offset`` and
``.size``). Field names are the ctypes ``_fields_`` names, except that a Python keyword gets a
trailing underscore (``lambda_`` is the header's ``lambda``). The program also prints every
``FEP_*`` integer constant of ``_abi`` as the header defines it. Every mismatch is reported, not
only the first: a field missing, extra, renamed or out of order, a wrong offset, size or type, a
struct of the header without a ctypes twin (or the other way round), a constant with another
value or missing from the header.

Run from the repository root (no pytest needed):

    python3 bindings/python/test_abi_layout.py

It prints one line per test and closes with "N passed, N failed, N skipped" (exit status 1 on a
failure), as the other binding tests do (_runner.py), but without loading the library.
``$FEP_KERNELS_HEADER`` overrides the header's path.
"""

import ctypes
import functools
import keyword
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _runner import run_functions  # noqa: E402
from fep_kernels import _abi  # noqa: E402  (after the path is set; needs no library, no torch)

HEADER = os.environ.get(
    "FEP_KERNELS_HEADER", os.path.join(HERE, os.pardir, os.pardir, "include", "fep_kernels.h")
)

# ctypes scalar types by the name the C side prints for the header's type (see KIND below).
_SCALARS = {
    ctypes.c_float: "float",
    ctypes.c_double: "double",
    ctypes.c_int32: "int32_t",
    ctypes.c_uint32: "uint32_t",
    ctypes.c_int64: "int64_t",
    ctypes.c_uint64: "uint64_t",
}


# ---- the Python side ----


def c_name(cls):
    """The header's name of a ctypes Structure class: `_FepSettleParams` -> `FepSettleParams`."""
    return cls.__name__.lstrip("_")


def c_field(name):
    """The header's name of a ctypes field: a keyword escaped with `_` (`lambda_`) loses it."""
    if name.endswith("_") and keyword.iskeyword(name[:-1]):
        return name[:-1]
    return name


def ctypes_structs(module=_abi):
    """The ctypes.Structure classes defined in `module`, by C name."""
    out = {}
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, ctypes.Structure)
            and value.__module__ == module.__name__
        ):
            out[c_name(value)] = value
    return out


def ctypes_constants(module=_abi):
    """The FEP_* integer constants of `module`."""
    return {
        k: v
        for k, v in vars(module).items()
        if re.fullmatch(r"FEP_[A-Z0-9_]+", k) and isinstance(v, int) and not isinstance(v, bool)
    }


def kind(ctype):
    """What a ctypes field type is, in the C program's words: a scalar's C type, "pointer", or
    ("array", element kind, length)."""
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        return ("array", kind(ctype._type_), ctype._length_)
    if ctype in (ctypes.c_void_p, ctypes.c_char_p) or (
        isinstance(ctype, type) and issubclass(ctype, ctypes._Pointer)
    ):
        return "pointer"
    return _SCALARS.get(ctype, f"unsupported ctypes type {ctype.__name__}")


# ---- the header's text: struct and field names, #defines ----


def read_header():
    with open(HEADER, encoding="utf-8") as f:
        return f.read()


def header_structs(text):
    """{struct name: [(field name, array length or None), ...]} of every `typedef struct X { ... }
    X;` of the (cbindgen-generated) header, in declaration order."""
    code = re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))
    out = {}
    for m in re.finditer(r"typedef\s+struct\s+(\w+)\s*\{(.*?)\}\s*(\w+)\s*;", code, flags=re.S):
        fields = []
        for decl in m.group(2).split(";"):
            if decl.strip():
                f = re.search(r"(\w+)\s*(?:\[\s*(\d+)\s*\])?\s*$", decl)
                fields.append((f.group(1), int(f.group(2)) if f.group(2) else None))
        out[m.group(3)] = fields
    return out


def header_defines(text):
    """The names of the header's FEP_* #defines (the include guard excluded)."""
    defines = re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(FEP_\w+)[ \t]+\S", text, flags=re.M)
    return {m.group(1) for m in defines}


# ---- the C side ----

_PROLOGUE = """#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include "fep_kernels.h"

#define KIND(x) _Generic((x), float: "float", double: "double", int32_t: "int32_t", \\
    uint32_t: "uint32_t", int64_t: "int64_t", uint64_t: "uint64_t", default: "other")
#define FIELD(T, f) printf("field %s %s %zu %zu %s\\n", #T, #f, offsetof(T, f), \\
    sizeof(((T *)0)->f), KIND(((T *)0)->f))
#define ARRAY(T, f) printf("array %s %s %zu %zu %s\\n", #T, #f, offsetof(T, f), \\
    sizeof(((T *)0)->f), KIND(((T *)0)->f[0]))

int main(void) {
"""


def c_program(structs, constants, hstructs):
    """The C program printing the header's view of `structs` (C name -> ctypes class; only the
    fields the header has, so it compiles whatever ctypes says) and of `constants`."""
    lines = [_PROLOGUE]
    for name, cls in sorted(structs.items()):
        if name not in hstructs:
            continue
        lines.append(
            f'    printf("struct %s %zu %zu\\n", "{name}", sizeof({name}), _Alignof({name}));'
        )
        arrays = {f for f, n in hstructs[name] if n is not None}
        wanted = {c_field(f[0]) for f in cls._fields_}
        for f, _ in hstructs[name]:
            if f in wanted:
                lines.append(f"    {'ARRAY' if f in arrays else 'FIELD'}({name}, {f});")
    for name in sorted(constants):
        lines.append(
            f'#ifdef {name}\n    printf("const %s %lld\\n", "{name}", (long long)({name}));\n'
            f'#else\n    printf("const %s undefined\\n", "{name}");\n#endif'
        )
    lines.append("    return 0;\n}\n")
    return "\n".join(lines)


def run_c(source):
    """Compiles and runs `source` against the header; its output lines, or None without `cc`."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None
    include = os.path.dirname(os.path.abspath(HEADER))
    with tempfile.TemporaryDirectory(prefix="fep-abi-layout-") as tmp:
        src, exe = os.path.join(tmp, "layout.c"), os.path.join(tmp, "layout")
        with open(src, "w", encoding="utf-8") as f:
            f.write(source)
        cmd = [cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", include, src, "-o", exe]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed:\n{built.stdout}{built.stderr}\n--- {src}:\n{source}"
            )
        return subprocess.run([exe], capture_output=True, text=True, check=True).stdout.splitlines()


def c_view(lines):
    """The C program's output as ({struct: (size, align)}, {(struct, field): (offset, size, kind)},
    {constant: value or None})."""
    structs, fields, consts = {}, {}, {}
    for line in lines:
        w = line.split()
        if w[0] == "struct":
            structs[w[1]] = (int(w[2]), int(w[3]))
        elif w[0] in ("field", "array"):
            k = w[5] if w[0] == "field" else ("array", w[5])
            fields[(w[1], w[2])] = (int(w[3]), int(w[4]), k)
        elif w[0] == "const":
            consts[w[1]] = None if w[2] == "undefined" else int(w[2])
    return structs, fields, consts


# ---- the comparison ----


def compare_structs(structs, header_text):
    """Every difference between the ctypes classes `structs` (C name -> class) and the header,
    as a list of messages; None when there is no C compiler."""
    hstructs = header_structs(header_text)
    errors = []
    for name in sorted(set(hstructs) - set(structs)):
        errors.append(f"struct {name} of the header has no ctypes twin in _abi.py")
    for name in sorted(set(structs) - set(hstructs)):
        errors.append(f"ctypes {structs[name].__name__}: the header defines no struct {name}")
    out = run_c(c_program(structs, {}, hstructs))
    if out is None:
        return None
    sizes, fields, _ = c_view(out)
    for name, cls in sorted(structs.items()):
        if name not in hstructs:
            continue
        py_names = [c_field(f[0]) for f in cls._fields_]
        c_names = [f for f, _ in hstructs[name]]
        for f in c_names:
            if f not in py_names:
                errors.append(f"{name}.{f}: in the header, missing from {cls.__name__}._fields_")
        for f in py_names:
            if f not in c_names:
                errors.append(f"{name}.{f}: in {cls.__name__}._fields_, not in the header")
        common_py = [f for f in py_names if f in c_names]
        common_c = [f for f in c_names if f in py_names]
        if common_py != common_c:
            errors.append(f"{name}: fields in another order: ctypes {common_py}, header {common_c}")
        size, align = sizes[name]
        if (ctypes.sizeof(cls), ctypes.alignment(cls)) != (size, align):
            errors.append(
                f"{name}: ctypes size {ctypes.sizeof(cls)} align {ctypes.alignment(cls)}, "
                f"C size {size} align {align}"
            )
        for py_field, ctype in ((f[0], f[1]) for f in cls._fields_):
            f = c_field(py_field)
            if (name, f) not in fields:
                continue
            c_off, c_size, c_kind = fields[(name, f)]
            desc = getattr(cls, py_field)
            if (desc.offset, desc.size) != (c_off, c_size):
                errors.append(
                    f"{name}.{f}: ctypes offset {desc.offset} size {desc.size}, "
                    f"C offset {c_off} size {c_size}"
                )
            py_kind = kind(ctype)
            if isinstance(py_kind, tuple):
                elem_size = ctypes.sizeof(ctype._type_)
                ok = c_kind[0] == "array" and (
                    c_kind[1] == py_kind[1] or (py_kind[1] == "pointer" and c_kind[1] == "other")
                ) and c_size == elem_size * py_kind[2]
            elif py_kind == "pointer":
                ok = c_kind == "other" and c_size == ctypes.sizeof(ctypes.c_void_p)
            else:
                ok = c_kind == py_kind
            if not ok:
                errors.append(f"{name}.{f}: ctypes {ctype.__name__} ({py_kind}), C {c_kind}")
    return errors


def compare_constants(constants, header_text):
    """Every FEP_* constant of `constants` whose value differs from the header's (or that the
    header lacks); None when there is no C compiler."""
    out = run_c(c_program({}, constants, {}))
    if out is None:
        return None
    _, _, consts = c_view(out)
    errors = []
    for name, value in sorted(constants.items()):
        if consts.get(name) is None:
            errors.append(f"{name} = {value} in _abi.py is not #defined in the header")
        elif consts[name] != value:
            errors.append(f"{name}: _abi.py {value}, header {consts[name]}")
    return errors


@functools.lru_cache(maxsize=None)
def _header():
    return read_header()


def _report(errors, what):
    if errors is None:
        return "SKIPPED: no C compiler (set CC or put cc on PATH)"
    assert not errors, f"{len(errors)} {what}:\n  " + "\n  ".join(errors)
    return None


# ---- the tests ----


def test_abi_imports_without_torch_or_library():
    # A fresh interpreter in which `import torch` fails (whether or not torch is installed).
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import fep_kernels._abi\n"
        "assert 'torch' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code, HERE], capture_output=True, text=True)
    assert r.returncode == 0, f"import fep_kernels._abi without torch failed:\n{r.stderr}"


def test_every_struct_has_a_twin():
    structs = ctypes_structs()
    hstructs = header_structs(_header())
    assert len(hstructs) >= 10, f"too few structs parsed from {HEADER}: {sorted(hstructs)}"
    missing = sorted(set(hstructs) - set(structs))
    extra = sorted(set(structs) - set(hstructs))
    assert not missing and not extra, (
        f"structs of the header without a ctypes twin: {missing}; "
        f"ctypes classes without a struct in the header: {extra}"
    )


def test_struct_layouts_match_the_header():
    structs = ctypes_structs()
    for name, cls in sorted(structs.items()):
        print(f"     {name}: {ctypes.sizeof(cls)} bytes, {len(cls._fields_)} fields")
    return _report(compare_structs(structs, _header()), "struct mismatches")


def test_constants_match_the_header():
    constants = ctypes_constants()
    assert len(constants) >= 30, f"too few FEP_* constants in _abi.py: {sorted(constants)}"
    missing = sorted(header_defines(_header()) - set(constants))
    if missing:
        print(f"     note: header constants without a twin in _abi.py: {missing}")
    return _report(compare_constants(constants, _header()), "constant mismatches")


def test_every_status_code_has_a_twin_and_a_name():
    """Every FEP_OK / FEP_ERR_* status of the header (FEP_ERR_DIVERGED = 7 included) has a
    twin in _abi.py and a name in FepError's table, so a new status is never reported as
    "unknown status N" (the other header constants may lag behind: test_constants only notes
    them)."""
    statuses = sorted(n for n in header_defines(_header()) if n == "FEP_OK" or
                      n.startswith("FEP_ERR_"))
    assert "FEP_ERR_DIVERGED" in statuses, f"FEP_ERR_DIVERGED not found in {HEADER}"
    missing = [n for n in statuses if not isinstance(getattr(_abi, n, None), int)]
    assert not missing, f"header statuses without a twin in _abi.py: {missing}"
    unnamed = [n for n in statuses if _abi._STATUS_NAMES.get(getattr(_abi, n)) != n]
    assert not unnamed, f"statuses without their name in _abi._STATUS_NAMES: {unnamed}"
    e = _abi.FepError(_abi.FEP_ERR_DIVERGED, "settling sample 0 diverged")
    assert e.name == "FEP_ERR_DIVERGED" and str(e).startswith("FEP_ERR_DIVERGED (7): "), str(e)
    return None


def test_the_comparison_catches_broken_twins():
    """The checks themselves: a dropped field, two swapped fields, a renamed field, a wrong
    type of the same size, a wrong constant and a class with no struct are each reported."""

    def variant(cls, fields):
        return type(cls.__name__, (ctypes.Structure,), {"_fields_": fields})

    good = _abi._FepSettleParams
    f = list(good._fields_)
    cases = {
        "dropped": variant(good, f[:-1]),
        "swapped": variant(good, [f[1], f[0]] + f[2:]),
        "renamed": variant(good, [("etaa", f[0][1])] + f[1:]),
        "retyped": variant(good, [(f[0][0], ctypes.c_int32)] + f[1:]),
    }
    header = _header()
    for what, cls in cases.items():
        errors = compare_structs({"FepSettleParams": cls}, header)
        if errors is None:
            return "SKIPPED: no C compiler"
        # Only this struct is compared: the others of the header are reported as missing twins.
        own = [e for e in errors if e.startswith("FepSettleParams")]
        assert own, f"{what}: not caught ({errors})"
    errors = compare_structs({"FepNoSuchStruct": good}, header)
    assert any("FepNoSuchStruct" in e for e in errors), errors
    assert compare_constants({"FEP_OK": 1, "FEP_NO_SUCH": 0}, header) == [
        "FEP_NO_SUCH = 0 in _abi.py is not #defined in the header",
        "FEP_OK: _abi.py 1, header 0",
    ]
    return None


def main():
    print(f"test_abi_layout.py: {os.path.abspath(HEADER)} against fep_kernels/_abi.py")
    return run_functions(globals())


if __name__ == "__main__":
    sys.exit(main())
