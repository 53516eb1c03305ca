"""The import contracts of setup.cfg (checked by `lint-imports` in `make test`) classify every module of nsa_jax:
each is the model's or the processor's (or in nsa_jax.training), so a new module cannot slip past them. The tests
sit in folders by part (README "Layout"), each a package, so pytest collects every file once."""

import configparser
import pathlib

import tests

ROOT = pathlib.Path(tests.ROOT)
# Test folders: one per part, plus the shared oracles (references) and harness (support), which hold no tests.
TEST_PARTS = {"kernels", "model", "processor", "data", "training", "eval", "launch"}
TEST_SHARED = {"references", "support"}


def _modules(contract: str, key: str) -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return set(cfg[f"importlinter:contract:{contract}"][key].split())


def test_every_nsa_jax_module_is_the_models_or_the_processors():
    modules = {f"nsa_jax.{p.stem}" for p in (ROOT / "nsa_jax").glob("*.py") if p.stem != "__init__"}
    model, processor = _modules("model", "source_modules"), _modules("processor", "source_modules")
    assert not model & processor
    assert model | processor == modules, sorted(modules ^ (model | processor))
    # What the processor and the pipeline may not import: every model module, and the trainer.
    for contract in ("processor", "data"):
        assert model | {"nsa_jax.training"} <= _modules(contract, "forbidden_modules"), contract


def test_installs_only_the_two_libraries():
    """`pip install` puts nsa_jax and pallas_kernels in site-packages, never the generic names data / configs /
    launch (those run from the repository root)."""
    import setuptools

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    packages = setuptools.find_packages(str(ROOT), include=include)
    assert {p.split(".")[0] for p in packages} == {"nsa_jax", "pallas_kernels"}
    assert "nsa_jax.training" in packages


def test_tests_sit_in_their_parts_folders():
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == TEST_PARTS | TEST_SHARED, sorted(folders ^ (TEST_PARTS | TEST_SHARED))
    assert {p.name for p in (ROOT / "tests").glob("*.py")} == {"__init__.py", "test_structure.py"}
    for name in folders:
        folder = ROOT / "tests" / name
        assert (folder / "__init__.py").exists(), name  # module names tests.<part>.<file>: no basename clashes
        tests_here = [p.name for p in folder.glob("test_*.py")]
        assert bool(tests_here) == (name in TEST_PARTS), (name, tests_here)
        assert not [p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"], name
