#!/usr/bin/env python
"""Build an mmcv 2.1.0 wheel with compiled ops for the mmdet engine (what `make mmcv` runs).

Downloads the mmcv sdist with pip (or uses --sdist), raises its C++ standard to C++20 so it
compiles against torch 2.14, and builds with MMCV_WITH_OPS=1 against the installed torch
(--no-build-isolation, setuptools<70 from a private overlay). CUDA kernels are built when nvcc and
a CUDA torch are present (--cuda auto). Then: make install-mmdet MMCV_WHEEL=<printed wheel>.
"""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/wheels", help="Folder receiving the wheel (default: build/wheels).")
    parser.add_argument("--work-dir", default="build/mmcv", help="Download/build folder (default: build/mmcv).")
    parser.add_argument("--sdist", default=None, help="A downloaded mmcv-2.1.0.tar.gz (offline machines).")
    parser.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto",
                        help="Build CUDA kernels: auto = when nvcc and a CUDA torch are present.")
    parser.add_argument("--jobs", type=int, default=None, help="Parallel compile jobs (default: all cores).")
    parser.add_argument("--log", default=None, help="Log file.")
    args = parser.parse_args()

    from cxrssl.detection.mmcv_build import build_mmcv
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    wheel = build_mmcv(args.out, args.work_dir, sdist=args.sdist, cuda=args.cuda, jobs=args.jobs)
    print(wheel)


if __name__ == "__main__":
    main()
