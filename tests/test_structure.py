"""The import contracts of setup.cfg (checked by `lint-imports` in `make test`) classify every module of nsa_jax:
each is the model's or the processor's (or in nsa_jax.training), so a new module cannot slip past them."""

import configparser
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
