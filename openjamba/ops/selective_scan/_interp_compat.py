"""Keep the Triton CPU interpreter usable with NumPy >= 2.4.

The interpreter stores kernel scalars as 1-element arrays and converts them to Python ints with
`int(array)`, which NumPy 2.4 rejects for arrays of rank > 0; a runtime loop bound (`range(0, n)`)
then fails. When TRITON_INTERPRET=1 this wraps the interpreter's tensor patching so `__index__` reads
the single element. It changes nothing when kernels are compiled for a GPU.
"""

import os


def install() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    if getattr(interpreter, "_openjamba_index_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._openjamba_index_fix = True


install()
