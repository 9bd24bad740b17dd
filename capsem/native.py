"""Native CPU kernels of EM routing, compiled on first use.

`capsem/native/em_routing.cc` holds two TensorFlow ops, `CapsemEmRouting`
and its gradient `CapsemEmRoutingGrad`, which route one problem at a time
with its votes in a per-thread buffer that stays in the core's cache (see
the comment at the top of the file). `capsem/native/em_routing_paper.cc`
holds their siblings for the paper's routing (`capsem.paper_routing`),
`CapsemEmRoutingPaper` and `CapsemEmRoutingPaperGrad`, whose E-step
normalises a child over the parents at every output position that receives
it. Both sources include the shared helpers of `capsem/native/em_common.h`
and are compiled into one library with the C++ compiler of the machine
(`choose_compiler`: `$CXX`, else the first of `g++`, `c++` and `clang++` on
the PATH) against the headers of the installed TensorFlow, once per source,
compiler, TensorFlow version and CPU, into a cache directory
(`$CAPSEM_CACHE_DIR`, else `~/.cache/capsem`), which takes about 15 s the
first time. They are built for the CPU that runs them (`-march=native`), or
for the target `$CAPSEM_NATIVE_ARCH` names (`arch_flags`).

`capsem.ops` and `capsem.paper_routing` use them for EM routing by default
when they build; where they cannot (no compiler, TensorFlow without
headers, another OS), they fall back to the XLA routing kernels with a
warning and the same numbers to float32 rounding. `CAPSEM_NATIVE=0` in the
environment turns them off; `with capsem.ops.native_routing_kernels(False):`
does so for the routing built inside it.
"""

import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

import tensorflow as tf

_NATIVE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
#: The article's routing kernels.
_SOURCE = os.path.join(_NATIVE_DIR, "em_routing.cc")
#: The paper's routing kernels (`capsem.paper_routing`).
_PAPER_SOURCE = os.path.join(_NATIVE_DIR, "em_routing_paper.cc")
#: The helpers both include.
_HEADER = os.path.join(_NATIVE_DIR, "em_common.h")
_LOCK = threading.Lock()
_STATE = {}

#: Compilers tried, in order, when `$CXX` is unset. g++ comes first: the kernels
#: are tuned and measured with GCC, and `c++` is Clang on some systems.
COMPILERS = ("g++", "c++", "clang++")

log = logging.getLogger("capsem")


class NativeBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded."""


def enabled_by_environment():
    """False when `CAPSEM_NATIVE` is set to 0, false, no or off."""
    return os.environ.get("CAPSEM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def choose_compiler(environ=None, which=shutil.which):
    """The command that compiles the kernels: `$CXX`, else the first of `COMPILERS` found.

    Args:
      environ: the environment to read `CXX` from (default `os.environ`); it
        may hold arguments after the program, e.g. "ccache g++".
      which: finds a program on the PATH and returns its path or None
        (default `shutil.which`).

    Returns:
      the command as a list, its program as the path `which` found.

    Raises:
      NativeBuildError: `$CXX` names a program that is not found, or it is
        unset and none of `COMPILERS` is found.
    """
    environ = os.environ if environ is None else environ
    cxx = environ.get("CXX", "").strip()
    if cxx:
        try:
            args = shlex.split(cxx)
        except ValueError as err:
            raise NativeBuildError(f"cannot parse $CXX {cxx!r}: {err}") from None
        found = which(args[0])
        if not found:
            raise NativeBuildError(f"C++ compiler {cxx!r} ($CXX) not found")
        return [found, *args[1:]]
    for name in COMPILERS:
        found = which(name)
        if found:
            return [found]
    raise NativeBuildError(f"no C++ compiler found (tried {', '.join(COMPILERS)}): install "
                           f"g++ (e.g. apt-get install g++) or set $CXX")


def _compiler_key():
    """The chosen compiler for the cache key: its command and the program's real path."""
    try:
        cmd = choose_compiler()
    except NativeBuildError:
        return ""  # no cached library matches; building then raises the error
    return " ".join([os.path.realpath(cmd[0]), *cmd])


def _cpu_key():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The target CPU's flags when `$CAPSEM_NATIVE_ARCH` is unset.
DEFAULT_ARCH = "-march=native"


def arch_flags(environ=None):
    """The compiler's target-CPU flags: `$CAPSEM_NATIVE_ARCH` if set, else `-march=native`.

    `-march=native` builds for the machine that runs the kernels (the cache key
    holds its CPU's feature flags). `CAPSEM_NATIVE_ARCH` builds for another
    target, e.g. `-march=haswell` for every AVX2 machine of a cluster, and
    selects the kernels' code path: AVX-512, AVX2 (`Vec` as two 8-float
    halves, see `capsem/native/em_common.h`) or generic.

    Raises:
      NativeBuildError: `$CAPSEM_NATIVE_ARCH` cannot be parsed.
    """
    environ = os.environ if environ is None else environ
    value = environ.get("CAPSEM_NATIVE_ARCH", "").strip()
    if not value:
        return [DEFAULT_ARCH]
    try:
        return shlex.split(value)
    except ValueError as err:
        raise NativeBuildError(f"cannot parse $CAPSEM_NATIVE_ARCH {value!r}: {err}") from None


def _flags():
    # AVX-512 FP16 is switched off because GCC 12 cannot compile Eigen's FP16
    # code in TensorFlow's headers.
    compile_flags = list(tf.sysconfig.get_compile_flags())
    link_flags = list(tf.sysconfig.get_link_flags())
    return (["-shared", "-fPIC", "-O3", "-fno-math-errno", "-w"],
            [*arch_flags(), "-mno-avx512fp16"], compile_flags, link_flags)


def _sources():
    """The C++ sources compiled into the one library."""
    return [_SOURCE, _PAPER_SOURCE]


def library_path():
    """Where the compiled library for these sources, compiler, TensorFlow and CPU is cached."""
    source = b""
    for path in (*_sources(), _HEADER):
        with open(path, "rb") as f:
            source += f.read() + b"\0"
    base, arch, compile_flags, link_flags = _flags()
    key = hashlib.sha256()
    for part in (source, tf.__version__.encode(), _cpu_key().encode(), sys.platform.encode(),
                 " ".join(base + arch + compile_flags + link_flags).encode(),
                 _compiler_key().encode()):
        key.update(part)
        key.update(b"\0")
    cache = os.environ.get("CAPSEM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "capsem")
    return os.path.join(cache, f"em_routing-{key.hexdigest()[:16]}.so")


def _build(cxx, base, extra, compile_flags, link_flags, tmp):
    """Compiles every source into an object file, all at once (one compiler process each,
    so the cores share the work), then links them into `tmp`.

    Returns:
      None on success, else the failing command and the end of its error output.
    """
    objects = [f"{tmp}.{i}.o" for i in range(len(_sources()))]
    try:
        procs = []
        for source, obj in zip(_sources(), objects):
            cmd = [*cxx, *base[1:], *extra, "-c", source, "-o", obj, *compile_flags]
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, text=True)))
        failed = None
        for cmd, proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0 and failed is None:
                failed = f"$ {' '.join(cmd)}\n{err[-2000:]}"
        if failed:
            return failed
        cmd = [*cxx, *base, *extra, *objects, "-o", tmp, *link_flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return None if proc.returncode == 0 else f"$ {' '.join(cmd)}\n{proc.stderr[-2000:]}"
    finally:
        for obj in objects:
            if os.path.exists(obj):
                os.remove(obj)


def _compile(path):
    cxx = choose_compiler()
    base, arch, compile_flags, link_flags = _flags()  # base[0] is -shared: linking only
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    log.warning("capsem: compiling the native EM routing kernels (once, about 30-60 s) into %s",
                path)
    errors = []
    # Without -mno-avx512fp16 if the compiler does not know the flag; then, for
    # -march=native, without it (a compiler that does not know it).
    attempts = [arch, arch[:-1]] + ([[]] if arch[:-1] == [DEFAULT_ARCH] else [])
    try:
        for extra in attempts:
            error = _build(cxx, base, extra, compile_flags, link_flags, tmp)
            if error is None:
                os.replace(tmp, path)  # atomic: concurrent builds do not see half a file
                if not extra:
                    log.warning("capsem: the native EM routing kernels were built without "
                                "%s, which the compiler refused; they run several times "
                                "slower. The compiler said:\n%s", DEFAULT_ARCH, errors[-1])
                return
            errors.append(error)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    raise NativeBuildError("compiling the native EM routing kernels failed:\n" + "\n".join(errors))


def load():
    """The loaded op library (compiled first if needed).

    Raises:
      NativeBuildError: it could not be compiled or loaded; the message says why.
    """
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]
        if "error" in _STATE:
            raise _STATE["error"]
        try:
            path = library_path()
            if not os.path.exists(path):
                _compile(path)
            try:
                module = tf.load_op_library(path)
            except Exception as err:  # a broken cached file: rebuild once
                log.warning("capsem: reloading %s failed (%s); rebuilding", path, err)
                os.remove(path)
                _compile(path)
                module = tf.load_op_library(path)
        except (NativeBuildError, OSError, tf.errors.OpError, ValueError) as err:
            error = err if isinstance(err, NativeBuildError) else NativeBuildError(str(err))
            _STATE["error"] = error
            raise error from err
        _STATE["module"] = module
        return module


def available():
    """Whether the native kernels are enabled and load (compiling them if needed).

    On the first failure it logs one warning saying why, and the routing
    uses the XLA kernels.
    """
    if not enabled_by_environment():
        return False
    try:
        load()
        return True
    except NativeBuildError as err:
        if not _STATE.get("warned"):
            _STATE["warned"] = True
            log.warning("capsem: native EM routing kernels unavailable, using the XLA "
                        "kernels instead: %s", err)
        return False


@tf.RegisterGradient("CapsemEmRouting")
def _em_routing_grad(op, g_mean, g_act, g_saved_rr, g_stats):
    """Gradient of CapsemEmRouting w.r.t. the votes (or poses and w), a, beta_v, beta_a.

    The saved assignments and statistics are internal outputs: gradients
    arriving at them (e.g. from the diagnostic assignments) are not propagated.
    """
    del g_saved_rr, g_stats
    return _gradient(load().capsem_em_routing_grad, op, g_mean, g_act,
                     ("inverse_temperatures", "stable"))


def _gradient(grad_op, op, g_mean, g_act, attrs):
    """The gradients of a routing op's inputs by its gradient op `grad_op`, which takes the
    op's first six inputs (src, w, offsets, a, beta_v, beta_a), its saved assignments and
    statistics, the output gradients, the op's further inputs (the paper op's
    inverse_temperature) and the op's attributes named in `attrs`; none for the constant
    offsets, none for w with votes, none for the further inputs (set by a schedule, not
    learned)."""
    mean, act, saved_rr, stats = op.outputs
    if g_mean is None:
        g_mean = tf.zeros_like(mean)
    if g_act is None:
        g_act = tf.zeros_like(act)
    src, w, offsets, a, beta_v, beta_a, *further = op.inputs
    g_src, g_w, g_a, g_beta_v, g_beta_a = grad_op(
        src, w, offsets, a, beta_v, beta_a, saved_rr, stats, g_mean, g_act, *further,
        **{name: op.get_attr(name) for name in attrs})
    from_poses = src.shape.rank == 3
    return [g_src, g_w if from_poses else None, None, g_a, g_beta_v, g_beta_a] + [
        None] * len(further)


#: The attributes of CapsemEmRoutingPaper that its gradient op takes as well.
_PAPER_ATTRS = ("inverse_temperatures", "variance_floor", "positions", "child_index",
                "num_sources", "assignment_gradient", "cost")


@tf.RegisterGradient("CapsemEmRoutingPaper")
def _em_routing_paper_grad(op, g_mean, g_act, g_saved_rr, g_stats):
    """Gradient of CapsemEmRoutingPaper w.r.t. the votes (or poses and w), a, beta_v, beta_a.

    As for CapsemEmRouting, the saved assignments and statistics are internal
    outputs whose gradients are not propagated.
    """
    del g_saved_rr, g_stats
    return _gradient(load().capsem_em_routing_paper_grad, op, g_mean, g_act, _PAPER_ATTRS)
