"""Settings: TOML, environment overrides and one-line errors."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from ensemble_ops.config import Settings
from ensemble_ops.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "ensemble.toml"


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    path = tmp_path / "ensemble.toml"
    path.write_text(text)
    return path


MINIMAL = '[[models]]\nname = "a"\npath = "m.gguf"\n'
TWO = MINIMAL + '[[models]]\nname = "b"\npath = "m.gguf"\n'


class TestExample:
    def test_production_example_loads(self, tmp_path: Path) -> None:
        """docs/examples/ensemble.toml validates once its GGUF files exist."""
        config = tmp_path / "ensemble.toml"
        shutil.copy(EXAMPLE, config)
        for model in tomllib.loads(EXAMPLE.read_text())["models"]:
            (tmp_path / model["path"]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / model["path"]).write_bytes(b"GGUF")
        settings = Settings.from_toml(config, environ={})
        assert [m.name for m in settings.models] == ["qwen", "mistral", "llama"]
        assert all(m.n_gpu_layers == -1 for m in settings.models)
        assert settings.modes["fast"].prefer == ("qwen", "mistral")
        assert settings.splits["chat-ab"].weights == {"qwen": 90.0, "mistral": 10.0}
        assert settings.model("qwen").path == tmp_path / "models/qwen2.5-7b-instruct-q4_k_m.gguf"

    def test_example_without_models_names_the_missing_file(self, tmp_path: Path) -> None:
        """The example's GGUF files are placeholders: loading without them says which."""
        config = tmp_path / "ensemble.toml"
        shutil.copy(EXAMPLE, config)
        with pytest.raises(ConfigError, match=r"^models\[0\]\.path: GGUF file not found"):
            Settings.from_toml(config, environ={})


class TestDefaults:
    def test_minimal_config_gets_safe_defaults(self, tmp_path: Path) -> None:
        """Loopback, port 8000, 1 MiB body limit, no admin token, three modes."""
        settings = Settings.from_toml(_write(tmp_path, MINIMAL), environ={})
        assert settings.server.host == "127.0.0.1"
        assert settings.server.port == 8000
        assert settings.server.max_body_bytes == 1024 * 1024
        assert settings.server.admin_token is None
        assert set(settings.modes) == {"fast", "balanced", "creative"}
        assert settings.model("a").path == tmp_path / "m.gguf"
        assert (settings.cache.backend, settings.cache.timeout_s) == ("memory", 0.05)
        assert (settings.server.drain_delay_s, settings.server.shutdown_timeout_s) == (5.0, 30.0)

    def test_one_mode_tuned_keeps_the_others(self, tmp_path: Path) -> None:
        """A [modes.fast] table does not erase balanced and creative."""
        text = MINIMAL + "[modes.fast]\nmax_tokens = 8\ntemperature = 0.0\ntop_p = 1.0\n"
        settings = Settings.from_toml(_write(tmp_path, text), environ={})
        assert settings.modes["fast"].max_tokens == 8
        assert settings.modes["creative"].temperature == 1.0

    def test_one_key_of_a_mode_keeps_its_other_defaults(self, tmp_path: Path) -> None:
        """[modes.fast] with only prefer keeps fast's max_tokens, temperature and top_p."""
        text = MINIMAL + '[modes.fast]\nprefer = ["a"]\n[modes.creative]\ntemperature = 1.3\n'
        settings = Settings.from_toml(_write(tmp_path, text), environ={})
        defaults = Settings.from_toml(_write(tmp_path, MINIMAL), environ={}).modes
        assert settings.modes["fast"] == defaults["fast"].model_copy(update={"prefer": ("a",)})
        assert settings.modes["creative"].temperature == 1.3
        assert settings.modes["creative"].max_tokens == defaults["creative"].max_tokens
        assert settings.modes["balanced"] == defaults["balanced"]

    def test_latency_targets_and_the_compute_budget(self, tmp_path: Path) -> None:
        """The modes' latency targets default to the product's 2.5 / 3 / 4 s and can be set;
        the compute budget defaults to the machine's (None) and can be fixed."""
        settings = Settings.from_toml(_write(tmp_path, MINIMAL), environ={})
        targets = {mode: spec.latency_target_s for mode, spec in settings.modes.items()}
        assert targets == {"fast": 2.5, "balanced": 3.0, "creative": 4.0}
        assert settings.server.compute_threads is None
        environ = {
            "ENSEMBLE_OPS_MODES__FAST__LATENCY_TARGET_S": "1.5",
            "ENSEMBLE_OPS_SERVER__COMPUTE_THREADS": "3",
        }
        tuned = Settings.from_toml(_write(tmp_path, MINIMAL), environ=environ)
        assert tuned.modes["fast"].latency_target_s == 1.5
        assert tuned.modes["fast"].max_tokens == settings.modes["fast"].max_tokens
        assert tuned.server.compute_threads == 3

    def test_one_key_of_a_mode_from_the_environment(self, tmp_path: Path) -> None:
        """ENSEMBLE_OPS_MODES__FAST__MAX_TOKENS alone changes that key only."""
        environ = {"ENSEMBLE_OPS_MODES__FAST__MAX_TOKENS": "12"}
        settings = Settings.from_toml(_write(tmp_path, MINIMAL), environ=environ)
        assert settings.modes["fast"].max_tokens == 12
        assert settings.modes["fast"].temperature == 0.2


class TestErrors:
    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (MINIMAL + "[server]\nprot = 1\n", r"^server\.prot: unknown key$"),
            (
                MINIMAL.replace('name = "a"', 'name = "a"\nn_ctx = "big"'),
                r"^models\[0\]\.n_ctx: Input should be a valid integer",
            ),
            (MINIMAL + '[server]\nport = "8000"\n', r"^server\.port: Input should be a valid"),
            (MINIMAL.replace("m.gguf", "nope.gguf"), r"^models\[0\]\.path: GGUF file not found"),
            (MINIMAL + MINIMAL, r"^models\[1\]\.name: duplicate model name 'a'$"),
            ('[[models]]\nname = "ensemble"\npath = "m.gguf"\n', r"^models\[0\]\.name: 'ensemble'"),
            (
                MINIMAL + "[modes.fast]\nmax_tokens = 1\ntemperature = 0.0\ntop_p = 1.0\n"
                'prefer = ["zz"]\n',
                r"^modes\.fast\.prefer: unknown model 'zz'$",
            ),
            ("", r"^models: Field required$"),
            (
                MINIMAL + "[server]\ncompute_threads = 0\n",
                r"^server\.compute_threads: Input should be greater than or equal to 1",
            ),
            (
                MINIMAL + "[modes.fast]\nlatency_target_s = 0\n",
                r"^modes\.fast\.latency_target_s: Input should be greater than 0",
            ),
            (
                MINIMAL.replace('name = "a"', 'name = "a"\nparallel = 0'),
                r"^models\[0\]\.parallel: Input should be greater than or equal to 1",
            ),
            (MINIMAL + "[tracing]\nenabled = 1\n", r"^tracing\.enabled: Input should be a valid"),
            (MINIMAL + "[modes.fast]\nmax_tokns = 8\n", r"^modes\.fast\.max_tokns: unknown key$"),
            (
                MINIMAL + "[modes.turbo]\nmax_tokens = 8\n",
                r"^modes\.turbo\.\[key\]: Input should be 'fast', 'balanced' or 'creative'",
            ),
            (MINIMAL + "[server]\nport = 70000\n", r"^server\.port: Input should be less"),
            (
                MINIMAL + '[cache]\nbackend = "redis"\n',
                r'^cache\.url: required when backend = "redis"',
            ),
            (
                MINIMAL + '[cache]\nbackend = "redis"\nurl = "http://cache:6379"\n',
                r"^cache\.url: must start with redis://, rediss:// or unix://$",
            ),
            (
                MINIMAL + '[cache]\nbackend = "redis"\nurl = "redis://:pw@cache:port/0"\n',
                r"^cache\.url: the port is not a number$",
            ),
            (
                MINIMAL + '[cache]\nbackend = "memcached"\n',
                r"^cache\.backend: Input should be 'memory' or 'redis'$",
            ),
            (
                MINIMAL + "[server]\ndrain_delay_s = -1.0\n",
                r"^server\.drain_delay_s: Input should be greater than or equal to 0$",
            ),
            (
                TWO + "[splits.ab]\nweights = {a = 1}\n",
                r"^splits\.ab\.weights: a split needs at least two members, not 1$",
            ),
            (
                TWO + "[splits.ab]\nweights = {a = 1, zz = 1}\n",
                r"^splits\.ab\.weights: unknown model 'zz'$",
            ),
            (
                TWO + "[splits.ab]\nweights = {a = 70, b = 0}\n",
                r"^splits\.ab\.weights\.b: Input should be greater than 0$",
            ),
            (
                TWO + '[splits.ab]\nweights = {a = "70", b = 30}\n',
                r"^splits\.ab\.weights\.a: Input should be a valid number$",
            ),
            (
                TWO + "[splits.ab]\nweights = {a = inf, b = 30}\n",
                r"^splits\.ab\.weights\.a: Input should be a finite number$",
            ),
            (TWO + "[splits.ab]\n", r"^splits\.ab\.weights: Field required$"),
            (
                TWO + "[splits.ab]\nweights = {a = 1, b = 1}\nsticky = true\n",
                r"^splits\.ab\.sticky: unknown key$",
            ),
            (
                TWO + "[splits.ensemble]\nweights = {a = 1, b = 1}\n",
                r"^splits\.ensemble: 'ensemble' is reserved for routing$",
            ),
            (
                TWO + "[splits.a]\nweights = {a = 1, b = 1}\n",
                r"^splits\.a: a model is already named 'a'$",
            ),
            (
                TWO + '[splits."a b"]\nweights = {a = 1, b = 1}\n',
                r"^splits\.a b\.\[key\]: String should match pattern",
            ),
            (
                MINIMAL + '[server]\nadmin_bind = "0.0.0.0:8001"\n',
                r"^server\.admin_bind: 0\.0\.0\.0:8001 is reachable from other hosts; set server",
            ),
            (
                MINIMAL + '[server]\nadmin_bind = "127.0.0.1:8000"\n',
                r"^server\.admin_bind: port 8000 is the public port",
            ),
            (MINIMAL + '[server]\nadmin_bind = "unix:"\n', r"^server\.admin_bind: unix: needs"),
            (
                MINIMAL + '[server]\nadmin_bind = "localhost:99999"\n',
                r"^server\.admin_bind: the port of 'localhost:99999' is not a port number",
            ),
            (
                MINIMAL + '[[auth.keys]]\nname = "a"\nkey_sha256 = "secret"\n',
                r"^auth\.keys\[0\]\.key_sha256: String should match pattern",
            ),
            (
                MINIMAL + f'[[auth.keys]]\nname = "a"\nkey_sha256 = "{"0" * 64}"\nrpm = 0\n',
                r"^auth\.keys\[0\]\.rpm: Input should be greater than 0",
            ),
            (
                MINIMAL
                + f'[[auth.keys]]\nname = "a"\nkey_sha256 = "{"0" * 64}"\nmodels = ["zz"]\n',
                r"^auth\.keys\[0\]\.models: unknown model 'zz'",
            ),
            (
                MINIMAL
                + f'[[auth.keys]]\nname = "a"\nkey_sha256 = "{"0" * 64}"\n'
                + f'[[auth.keys]]\nname = "a"\nkey_sha256 = "{"1" * 64}"\n',
                r"^auth\.keys: duplicate key name 'a'",
            ),
            (
                MINIMAL + "[auth]\nprotect_observability = true\n",
                r"^auth: protect_observability needs at least one",
            ),
        ],
    )
    def test_bad_config_is_one_line_naming_the_key(
        self, tmp_path: Path, text: str, message: str
    ) -> None:
        """Each problem stops start-up with one line that starts with the key."""
        with pytest.raises(ConfigError, match=message) as caught:
            Settings.from_toml(_write(tmp_path, text), environ={})
        assert "\n" not in str(caught.value)

    def test_invalid_toml(self, tmp_path: Path) -> None:
        """A syntax error names the file."""
        with pytest.raises(ConfigError, match="invalid TOML"):
            Settings.from_toml(_write(tmp_path, "[server"), environ={})

    def test_missing_config_file(self, tmp_path: Path) -> None:
        """A config path that does not exist is named."""
        with pytest.raises(ConfigError, match="config file not found"):
            Settings.from_toml(tmp_path / "none.toml", environ={})


class TestSplits:
    def test_a_split_from_the_file(self, tmp_path: Path) -> None:
        """[splits.NAME] weights name members; the others get no split."""
        text = TWO + "[splits.ab]\nweights = {a = 70, b = 30.5}\n"
        settings = Settings.from_toml(_write(tmp_path, text), environ={})
        assert settings.splits["ab"].weights == {"a": 70.0, "b": 30.5}
        assert Settings.from_toml(_write(tmp_path, TWO), environ={}).splits == {}

    def test_weights_from_the_environment(self, tmp_path: Path) -> None:
        """ENSEMBLE_OPS_SPLITS__NAME__WEIGHTS replaces a split's weights, or makes a split;
        ..._WEIGHTS__MEMBER changes one weight."""
        text = TWO + "[splits.ab]\nweights = {a = 70, b = 30}\n"
        whole = {"ENSEMBLE_OPS_SPLITS__AB__WEIGHTS": "{a = 10, b = 90}"}
        settings = Settings.from_toml(_write(tmp_path, text), environ=whole)
        assert settings.splits["ab"].weights == {"a": 10.0, "b": 90.0}
        one = {"ENSEMBLE_OPS_SPLITS__AB__WEIGHTS__B": "50"}
        settings = Settings.from_toml(_write(tmp_path, text), environ=one)
        assert settings.splits["ab"].weights == {"a": 70.0, "b": 50.0}
        new = {"ENSEMBLE_OPS_SPLITS__BA__WEIGHTS": "{b = 1, a = 1}"}
        settings = Settings.from_toml(_write(tmp_path, TWO), environ=new)
        assert settings.splits["ba"].weights == {"b": 1.0, "a": 1.0}

    def test_a_bad_override_names_the_key(self, tmp_path: Path) -> None:
        """An override that breaks a split fails like the same mistake in the file."""
        env = {"ENSEMBLE_OPS_SPLITS__AB__WEIGHTS__B": "-1"}
        text = TWO + "[splits.ab]\nweights = {a = 70, b = 30}\n"
        with pytest.raises(ConfigError, match=r"^splits\.ab\.weights\.b: Input should be greater"):
            Settings.from_toml(_write(tmp_path, text), environ=env)


class TestEnvironment:
    def test_overrides_server_and_model_by_name(self, tmp_path: Path) -> None:
        """ENSEMBLE_OPS_SECTION__KEY and ENSEMBLE_OPS_MODELS__NAME__KEY override the file."""
        env = {
            "ENSEMBLE_OPS_SERVER__PORT": "9001",
            "ENSEMBLE_OPS_SERVER__HOST": "0.0.0.0",
            "ENSEMBLE_OPS_SERVER__ADMIN_TOKEN": "s3cret",
            "ENSEMBLE_OPS_MODELS__A__N_GPU_LAYERS": "-1",
            "OTHER": "ignored",
        }
        settings = Settings.from_toml(_write(tmp_path, MINIMAL), environ=env)
        assert settings.server.port == 9001
        assert settings.server.host == "0.0.0.0"
        assert settings.server.admin_token is not None
        assert settings.server.admin_token.get_secret_value() == "s3cret"
        assert "s3cret" not in repr(settings)
        assert settings.model("a").n_gpu_layers == -1

    def test_a_redis_cache_from_the_environment_keeps_its_password_secret(
        self, tmp_path: Path
    ) -> None:
        """ENSEMBLE_OPS_CACHE__BACKEND/URL switch to Redis; the URL (which may hold a
        password) never shows in the settings' repr."""
        env = {
            "ENSEMBLE_OPS_CACHE__BACKEND": "redis",
            "ENSEMBLE_OPS_CACHE__URL": "redis://:hunter2@cache:6379/0",
        }
        settings = Settings.from_toml(_write(tmp_path, MINIMAL), environ=env)
        assert settings.cache.backend == "redis"
        assert settings.cache.url is not None
        assert settings.cache.url.get_secret_value() == "redis://:hunter2@cache:6379/0"
        assert "hunter2" not in repr(settings)
        assert "hunter2" not in str(settings.model_dump())

    def test_bad_override_names_the_key(self, tmp_path: Path) -> None:
        """A wrongly typed override fails like a wrongly typed file value."""
        env = {"ENSEMBLE_OPS_SERVER__PORT": "eighty"}
        with pytest.raises(ConfigError, match=r"^server\.port: Input should be a valid integer"):
            Settings.from_toml(_write(tmp_path, MINIMAL), environ=env)

    def test_override_for_unknown_model(self, tmp_path: Path) -> None:
        """An override naming no model is an error, not silently ignored."""
        env = {"ENSEMBLE_OPS_MODELS__ZZ__N_CTX": "8"}
        with pytest.raises(ConfigError, match="ENSEMBLE_OPS_MODELS__ZZ__N_CTX: no model named"):
            Settings.from_toml(_write(tmp_path, MINIMAL), environ=env)
