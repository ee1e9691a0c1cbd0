"""`make dist`: the wheel, the sdist and the two Debian packages (onprem-agent, onprem-control-plane).

One module per step: `versions` (the PEP 440 version and its Debian spelling), `python_dists` (wheel and
sdist from a copy of the checkout, at an overridden version if asked), `virtualenv` (the dependencies' wheels
and a virtualenv built for its place under /opt/onprem), `debian` (what each package holds and the .deb
itself), `manpages` (a page per command, from its argparse parser). The maintainer scripts, conffiles,
copyright and lintian overrides are files under packaging/debian/, read as they are.
"""
