"""Build decdec._C: the C core (CPU backend) always, the CUDA backend when nvcc is found.

Environment knobs:
  DECDEC_NO_CUDA=1          build the CPU backend only, even where nvcc exists
  DECDEC_CUDA_ARCHS=90      compute capabilities to compile for (default: 80;86;89;90)
  CUDA_HOME / CUDA_PATH     where the CUDA toolkit lives (default: the one nvcc is in)
  DECDEC_SANITIZE=1         build the C sources with ASan + UBSan (-O1, frame pointers, UB fatal);
                            load with LD_PRELOAD=$(gcc -print-file-name=libasan.so), see
                            bench/sanitize_cpu.sh. Use with DECDEC_NO_CUDA=1 and a separate
                            --build-lib so the normal in-place build is not replaced.
The CUDA runtime is linked statically, so a CUDA build imports and runs on the CPU on a machine
with no GPU or driver.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def find_cuda():
    if os.environ.get("DECDEC_NO_CUDA", "") not in ("", "0"):
        return None
    cuda_sources = sorted((CSRC / "cuda").glob("*.cu"))
    if not cuda_sources:
        return None
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    found = shutil.which("nvcc")
    if found:  # nvcc may be a symlink or a wrapper script in /usr/local/bin
        homes.append(str(Path(found).resolve().parent.parent))
    homes += ["/usr/local/cuda", "/opt/cuda"]
    for home in filter(None, homes):
        nvcc = Path(home, "bin", "nvcc")
        if not nvcc.exists():
            continue
        for d in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if Path(home, d, "libcudart_static.a").exists():
                return {"home": home, "nvcc": str(nvcc), "lib": str(Path(home, d)),
                        "sources": cuda_sources}
    if found:
        print("decdec: nvcc found but no CUDA home with libcudart_static.a; CPU backend only",
              file=sys.stderr)
    return None


CUDA = find_cuda()
CPU_BINDINGS = [CSRC / "python" / "module.c", CSRC / "python" / "py_declinear.c"]
# the CUDA binding files (py_declinear_cuda.c, py_device_array.c, ...) join only a CUDA build
CUDA_BINDINGS = [p for p in (CSRC / "python").glob("*.c") if p not in CPU_BINDINGS]
HAVE_CUDA_BINDING = (CSRC / "python" / "py_declinear_cuda.c").exists()
c_sources = rel(list((CSRC / "cpu").glob("*.c")) + [CSRC / "dd_host.c"] + CPU_BINDINGS
                + (CUDA_BINDINGS if CUDA and HAVE_CUDA_BINDING else []))
macros = []
include_dirs = [str(CSRC), numpy.get_include()]
libraries, library_dirs = [], []
if CUDA:
    macros += [("DD_WITH_CUDA", "1")]
    if HAVE_CUDA_BINDING:
        macros += [("DD_PY_CUDA", "1")]
    include_dirs.append(str(Path(CUDA["home"], "include")))
    libraries += ["cudart_static", "stdc++", "rt", "pthread", "dl"]
    library_dirs.append(CUDA["lib"])


def openmp_flag(compiler_cmd):
    """-fopenmp if the C compiler accepts it (gcc, clang with libomp), else nothing."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "t.c")
        src.write_text("#include <omp.h>\nint main(void){return omp_get_max_threads()<0;}\n")
        r = subprocess.run(compiler_cmd + ["-fopenmp", str(src), "-o", str(Path(d, "t"))],
                           capture_output=True)
        return ["-fopenmp"] if r.returncode == 0 else []


SANITIZE = os.environ.get("DECDEC_SANITIZE", "") not in ("", "0")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                  "-fno-sanitize-recover=undefined"]


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler_so[:1] if hasattr(self.compiler, "compiler_so") else ["cc"]
        omp = openmp_flag(cc)
        for ext in self.extensions:
            ext.extra_compile_args += omp
            ext.extra_link_args += omp
            if SANITIZE:
                # -O1 after the -O3 below: readable reports, still fast enough for the test suite
                ext.extra_compile_args += SANITIZE_FLAGS + ["-O1", "-g"]
                ext.extra_link_args += SANITIZE_FLAGS
            if CUDA:
                ext.extra_objects += self.compile_cuda()
        super().build_extensions()

    def compile_cuda(self):
        archs = os.environ.get("DECDEC_CUDA_ARCHS", "80;86;89;90").replace(",", ";").split(";")
        gencode = []
        for a in filter(None, archs):
            gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        out_dir = Path(self.build_temp, "cuda")
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in CUDA["sources"]:
            obj = out_dir / (src.stem + ".o")
            cmd = [CUDA["nvcc"], "-c", str(src), "-o", str(obj), "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC", "-I", str(CSRC), "-DDD_WITH_CUDA=1",
                   "--expt-relaxed-constexpr", *gencode]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(str(obj))
        return objects


ext = Extension(
    "decdec._C",
    sources=c_sources,
    include_dirs=include_dirs,
    define_macros=macros,
    libraries=libraries,
    library_dirs=library_dirs,
    extra_compile_args=["-std=c11", "-O3", "-Wall", "-Wno-unknown-pragmas"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
