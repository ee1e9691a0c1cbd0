"""The two Debian packages: what each holds, and the .deb built from a staging tree with dpkg-deb.

Each package has its own virtualenv under /opt/onprem/ (so the two can be installed and upgraded apart, on one
host or two), its commands linked into /usr/bin, its systemd unit (deploy/systemd/, with the virtualenv's paths),
its maintainer scripts (packaging/debian/maintscripts/, one set for both, filled in per package), its manual
pages, docs, copyright and lintian overrides. dpkg-deb builds the archive with every file owned by root
(--root-owner-group): nothing here needs fakeroot. Dependencies on system libraries come from dpkg-shlibdeps run
over the virtualenv's compiled modules, plus Debian's interpreter the virtualenv runs on and adduser.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tools.dist import virtualenv
from tools.dist.versions import debian_version

MAINTAINER = "onprem maintainers <maintainers@onprem.dev>"
HOMEPAGE = "https://github.com/onprem/onprem"
PACKAGING = Path("packaging") / "debian"


@dataclass(frozen=True)
class PackageSpec:
    name: str
    #: The system user (and group) the service runs as.
    user: str
    #: Where the package's virtualenv lives.
    venv: str
    config_dir: str
    state_dir: str
    #: Commands of the virtualenv linked into /usr/bin, each with the parser its manual page comes from.
    commands: dict[str, str]
    summary: str
    description: str
    gecos: str
    #: Conffiles: their path on the target, and their source in the repository.
    conffiles: dict[str, Path] = field(default_factory=dict)
    #: Config files that may hold a password, made 0640 root:<user> by postinst when present.
    private_config: tuple[str, ...] = ()
    #: More documentation: the path under /usr/share/doc/<name>/, and its source in the repository.
    docs: dict[str, Path] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return f"{self.name}.service"


AGENT = PackageSpec(
    name="onprem-agent",
    user="onprem-agent",
    venv="/opt/onprem/agent",
    config_dir="/etc/onprem-agent",
    state_dir="/var/lib/onprem-agent",
    commands={"onprem-agent": "onprem.agent.cli:build_parser"},
    summary="onprem agent: one outbound tunnel to the onprem control plane",
    description=(
        "The agent runs inside a private network, next to databases, folders and HTTP\n"
        "applications, and dials out to the onprem control plane over one bidirectional\n"
        "gRPC stream with mutual TLS. It serves only the profiles its config allows;\n"
        "the network opens no inbound port and credentials never leave the agent.\n"
        "\n"
        "The package holds the agent in its own virtualenv under /opt/onprem/agent, a\n"
        "hardened systemd unit, and a system user. It starts nothing until configured\n"
        "and enrolled."),
    gecos="onprem agent",
    private_config=("/etc/onprem-agent/env",),
    docs={"examples/agent.yaml": PACKAGING / "onprem-agent" / "agent.yaml"},
)

CONTROL_PLANE = PackageSpec(
    name="onprem-control-plane",
    user="onprem-control-plane",
    venv="/opt/onprem/control-plane",
    config_dir="/etc/onprem-control-plane",
    state_dir="/var/lib/onprem-control-plane",
    commands={"onprem-control-plane": "onprem.control_plane.cli:build_parser",
              "onprem": "onprem.operator_cli.main:build_parser"},
    summary="onprem control plane: operator API, agent tunnels and enrollment",
    description=(
        "The control plane agents of the onprem connectivity agent dial: it serves the\n"
        "operators' typed gRPC API (database, folder and HTTP app calls, agents,\n"
        "tokens, audit), holds each agent's stream, enrolls agents with its own CA,\n"
        "and keeps its state in SQLite or PostgreSQL.\n"
        "\n"
        "The package holds the control plane and the onprem operator CLI in their own\n"
        "virtualenv under /opt/onprem/control-plane, a hardened systemd unit, and a\n"
        "system user. It starts nothing until configured."),
    gecos="onprem control plane",
    conffiles={"/etc/onprem-control-plane/env": PACKAGING / "onprem-control-plane" / "env"},
    private_config=("/etc/onprem-control-plane/env",),
)

PACKAGES = (AGENT, CONTROL_PLANE)


@dataclass(frozen=True)
class BuiltPackage:
    spec: PackageSpec
    version: str
    deb: Path


def architecture() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True, text=True).stdout.strip()


def _fill(template: str, values: dict[str, str]) -> str:
    text = template
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"placeholders left unfilled: {sorted(set(left))}")
    return text


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def _gzip(data: bytes) -> bytes:
    # -n: no name and no time stamp in the header, so that the same input gives the same bytes.
    return gzip.compress(data, compresslevel=9, mtime=0)


def packaged_unit(root: Path, spec: PackageSpec) -> str:
    """The unit of deploy/systemd/ with the virtualenv's commands, and a header for the package."""
    text = (root / "deploy" / "systemd" / spec.unit).read_text()
    body = text[text.index("[Unit]"):]
    body = body.replace("/usr/local/bin/", f"{spec.venv}/bin/")
    header = (f"# Installed by the {spec.name} package. Change it with a drop-in (systemctl edit {spec.name}),\n"
              f"# not here: an upgrade replaces this file. See /usr/share/doc/{spec.name}/install.md.\n\n")
    return header + body


def _bundled(venv_dir: Path) -> str:
    """One copyright line per distribution in the virtualenv: its name, version and declared license."""
    lines = []
    for metadata in sorted(venv_dir.glob("lib/python3*/site-packages/*.dist-info/METADATA")):
        fields: dict[str, str] = {}
        classifiers: list[str] = []
        for line in metadata.read_text(errors="replace").split("\n\n", 1)[0].splitlines():
            key, _, value = line.partition(": ")
            if key == "Classifier" and value.startswith("License ::"):
                classifiers.append(value.rsplit(" :: ", 1)[-1])
            elif key in ("Name", "Version", "License-Expression", "License") and key not in fields:
                fields[key] = value.strip()
        license_ = fields.get("License-Expression") or ", ".join(classifiers) or fields.get("License", "")
        if len(license_) > 60 or not license_:
            license_ = "see its dist-info folder"
        lines.append(f" {fields.get('Name', metadata.parent.name)} {fields.get('Version', '')}: {license_}")
    return "\n".join(lines)


def _normalize_modes(tree: Path, executables: Path) -> None:
    """0755 for folders and the files of `executables` (the virtualenv's bin/), 0644 for every other file,
    whatever the builder's umask or the wheels' modes: modules (and the shared objects Python loads with
    dlopen) are not programs to run."""
    for path in [tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir() or (path.parent == executables and stat.S_IMODE(path.stat().st_mode) & 0o111):
            path.chmod(0o755)
        else:
            path.chmod(0o644)


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def _strip(tree: Path) -> None:
    """Strip the compiled modules as dh_strip would: their debug symbols are most of their size, and no use
    without the build tree they came from."""
    objects = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink() and _is_elf(p)]
    if objects:
        subprocess.run(["strip", "--strip-unneeded", "--remove-section=.comment", "--remove-section=.note",
                        *map(str, objects)], check=True, capture_output=True, timeout=300)


def _shlib_depends(tree: Path, work: Path) -> str:
    """The shared libraries the virtualenv's compiled modules need, as Debian dependencies (dpkg-shlibdeps)."""
    objects = sorted(str(p) for p in tree.rglob("*") if p.is_file() and not p.is_symlink()
                     and (p.suffix == ".so" or ".so." in p.name))
    if not objects:
        return ""
    # Libraries a wheel bundles (psycopg_binary.libs/ and the like) are found beside their users, by RPATH.
    private = sorted({f"-l{p}" for p in tree.rglob("*.libs") if p.is_dir()})
    control_dir = work / "shlibdeps"
    _write(control_dir / "debian" / "control", "Source: onprem\n\nPackage: onprem\nArchitecture: any\n")
    result = subprocess.run(["dpkg-shlibdeps", "-O", "--ignore-missing-info", *private, *(f"-e{o}" for o in objects)],
                            cwd=control_dir, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"dpkg-shlibdeps failed:\n{result.stderr[-4000:]}")
    for line in result.stdout.splitlines():
        if line.startswith("shlibs:Depends="):
            return line.removeprefix("shlibs:Depends=")
    return ""


def _changelog(spec: PackageSpec, version: str, python_version: str, when: float) -> bytes:
    return (f"{spec.name} ({version}) unstable; urgency=medium\n\n"
            f"  * onprem {python_version}, packaged by `make dist` (tools/dist). The project's\n"
            f"    changes are in its CHANGELOG.md.\n\n"
            f" -- {MAINTAINER}  {email.utils.formatdate(when)}\n").encode()


def _installed_size_kib(tree: Path) -> int:
    total = sum(p.lstat().st_size for p in tree.rglob("*") if not p.is_dir())
    return (total + 1023) // 1024 + len(list(tree.rglob("*")))


def _md5sums(tree: Path) -> str:
    lines = []
    for path in sorted(tree.rglob("*")):
        if path.is_file() and not path.is_symlink() and "DEBIAN" not in path.relative_to(tree).parts[:1]:
            lines.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {path.relative_to(tree)}")
    return "\n".join(lines) + "\n"


def stage_package(root: Path, spec: PackageSpec, python_version: str, built_venv: Path, work: Path,
                  when: float) -> Path:
    """The staging tree of one package under `work`: every file it installs, and DEBIAN/."""
    tree = work / spec.name
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    venv_dir = virtualenv.place(built_venv, tree, spec.venv)
    version = debian_version(python_version)
    doc = tree / "usr" / "share" / "doc" / spec.name

    for command, parser in spec.commands.items():
        link = tree / "usr" / "bin" / command
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"{spec.venv}/bin/{command}")
        page = subprocess.run([str(venv_dir / "bin" / "python"), str(root / "tools" / "dist" / "manpages.py"),
                               parser, command, python_version],
                              check=True, capture_output=True, timeout=120, env=virtualenv.clean_env()).stdout
        _write(tree / "usr" / "share" / "man" / "man1" / f"{command}.1.gz", _gzip(page))

    _write(tree / "lib" / "systemd" / "system" / spec.unit, packaged_unit(root, spec))
    for target, source in spec.conffiles.items():
        _write(tree / target.lstrip("/"), (root / source).read_bytes())
    _write(doc / "copyright", _fill((root / PACKAGING / "copyright.in").read_text(),
                                    {"VENV": spec.venv, "BUNDLED": _bundled(venv_dir)}))
    _write(doc / "changelog.Debian.gz", _gzip(_changelog(spec, version, python_version, when)))
    _write(doc / "install.md", (root / "docs" / "install.md").read_bytes())
    for name, source in spec.docs.items():
        _write(doc / name, (root / source).read_bytes())
    _write(tree / "usr" / "share" / "lintian" / "overrides" / spec.name,
           _fill((root / PACKAGING / "lintian-overrides.in").read_text(),
                 {"PACKAGE": spec.name, "VENV": spec.venv, "VENV_REL": spec.venv.lstrip("/"),
                  "PYTHON": python_major_minor()}))
    _strip(venv_dir)
    _normalize_modes(tree, venv_dir / "bin")

    values = {"PACKAGE": spec.name, "USER": spec.user, "VENV": spec.venv, "CONFIG_DIR": spec.config_dir,
              "STATE_DIR": spec.state_dir, "GECOS": spec.gecos, "PRIVATE_CONFIG": " ".join(spec.private_config)}
    control = tree / "DEBIAN"
    for script in ("postinst", "prerm", "postrm"):
        _write(control / script, _fill((root / PACKAGING / "maintscripts" / script).read_text(), values), 0o755)
    if spec.conffiles:
        _write(control / "conffiles", "".join(f"{path}\n" for path in spec.conffiles))
    depends = ", ".join(part for part in ("adduser", f"python{python_major_minor()}",
                                          _shlib_depends(venv_dir, work)) if part)
    description = "\n".join(" " + line if line else " ." for line in spec.description.splitlines())
    _write(control / "control", (
        f"Package: {spec.name}\n"
        f"Version: {version}\n"
        f"Architecture: {architecture()}\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Installed-Size: {_installed_size_kib(tree)}\n"
        f"Depends: {depends}\n"
        f"Section: net\n"
        f"Priority: optional\n"
        f"Homepage: {HOMEPAGE}\n"
        f"Description: {spec.summary}\n{description}\n"))
    _write(control / "md5sums", _md5sums(tree))
    return tree


def python_major_minor() -> str:
    return virtualenv.SYSTEM_PYTHON.removeprefix("/usr/bin/python")


def build_deb(tree: Path, out: Path, when: float) -> Path:
    """The .deb of a staging tree, into `out`, named as Debian names it."""
    fields = dict(line.split(": ", 1) for line in (tree / "DEBIAN" / "control").read_text().splitlines()
                  if ": " in line and not line.startswith(" "))
    deb = out / f"{fields['Package']}_{fields['Version']}_{fields['Architecture']}.deb"
    out.mkdir(parents=True, exist_ok=True)
    # xz at level 1: a tenth of level 6's time on the ~90 MB of a virtualenv, for an archive 15 % larger.
    # Every file's time is the release's (the commit's), so two builds of one commit give the same archive.
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "-z1", "--build", str(tree), str(deb)],
                   check=True, capture_output=True, timeout=900,
                   env={**os.environ, "SOURCE_DATE_EPOCH": str(int(when))})
    return deb
