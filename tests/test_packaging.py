"""An installed (non-editable) wheel carries the CUDA sources and finds them off the checkout."""

import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import molt_kernels
    from molt_kernels.ops.routing.cuda import CSRC, SOURCES, unavailable_reason

    package = Path(molt_kernels.__file__).parent
    assert Path(sys.argv[1]) not in package.parents, f"imported from the checkout: {package}"
    assert CSRC == package / "csrc", CSRC
    assert all((CSRC / name).is_file() for name in SOURCES), sorted(p.name for p in CSRC.iterdir())
    assert "not found" not in (unavailable_reason() or ""), unavailable_reason()
    print(CSRC)
    """
)


def test_wheel_ships_csrc_and_routing_finds_it(tmp_path: Path) -> None:
    # Build from a copy of the files git tracks or would track, so no build output leaks in.
    src = tmp_path / "src"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    for rel in listed:
        origin, target = ROOT / rel, src / rel
        if not (origin.is_symlink() or origin.is_file()):
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            target.symlink_to(origin.readlink())
        else:
            shutil.copy2(origin, target)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(src)],
        check=True,
    )
    (wheel,) = wheels.glob("molt_kernels-*.whl")
    env_dir = tmp_path / "venv"
    # System site packages give torch; the venv's own site-packages come first on its path.
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
        check=True,
    )
    out = subprocess.run(
        [python, "-c", CHECK, str(ROOT)], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    assert Path(out.stdout.strip()).is_relative_to(site)
