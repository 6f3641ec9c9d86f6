import pytest

from dpr_lib.config import load_config
from dpr_lib.errors import ConfigError


def test_local_yaml_loads_with_defaults():
    cfg = load_config("conf/local.yaml")
    assert cfg.spark.master == "local[*]"
    assert cfg.corpus.words == 100
    assert cfg.path("passages") == "./work/passages"
    assert cfg.path("index_root") == "./work/index"


def test_cluster_example_loads():
    cfg = load_config("conf/cluster.example.yaml")
    assert cfg.path("index_root").startswith("s3://")


def test_overrides_are_typed():
    cfg = load_config(None, ["corpus.words=50", "index.recall_target=0.9", "search.mmap=true",
                             "spark.conf={spark.executor.memory: 4g}"])
    assert cfg.corpus.words == 50 and cfg.index.recall_target == 0.9 and cfg.search.mmap is True
    assert cfg.spark.conf == {"spark.executor.memory": "4g"}


@pytest.mark.parametrize("override, message", [
    (["corpus.wordz=5"], "unknown config key corpus.wordz"),
    (["nosuch.key=1"], "unknown config key nosuch"),
    (["corpus.words=many"], "corpus.words must be of type int"),
    (["corpus.words=-1"], "corpus.words must be > 0, got -1"),
    (["corpus.overlap=100"], "corpus.overlap must be < corpus.words"),
    (["encoder.pooling=weighted"], "encoder.pooling must be one of"),
        (["encoder.input_template={title} only"], "encoder.input_template must be auto, pair, text or a template"),
    (["index.recall_target=1.5"], "index.recall_target must be within"),
    (["search.mmap=perhaps"], "search.mmap must be of type bool"),
    (["corpus=3"], "--set key must look like section.name"),
    (["words"], "--set expects key=value"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, override)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("index:\n  num_shards: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_storage_options_never_hold_credentials(monkeypatch):
    """Credentials reach fsspec through the AWS chain only: with keys in the environment, the
    storage options (which are logged and shipped to executors) still hold the endpoint alone, and
    a URL carrying user:secret@ is refused without echoing the secret."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-config-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-config-test")
    cfg = load_config(None, ["publish.endpoint_url=http://127.0.0.1:9000"])
    opts = cfg.storage_options()
    assert opts == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert "s3cr3t-config-test" not in repr(opts) and "AKIA-config-test" not in repr(opts)
    with pytest.raises(ConfigError, match="publish.endpoint_url contains credentials in a URL") as err:
        load_config(None, ["publish.endpoint_url=http://AKIA-config-test:s3cr3t-config-test@127.0.0.1:9000"])
    assert "s3cr3t-config-test" not in str(err.value)


def test_section_must_be_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("corpus: 3\n")
    with pytest.raises(ConfigError, match="corpus must be a mapping"):
        load_config(str(p))


def test_recall_questions_file_formats_and_errors(tmp_path):
    from dpr_lib.index import read_recall_questions

    def read(name, body, *extra):
        path = tmp_path / name
        path.write_bytes(body.encode() if isinstance(body, str) else body)
        return read_recall_questions(load_config(None, [f"paths.work_dir={tmp_path}", f"index.recall_questions={path}",
                                                        *extra]))

    assert read("q.txt", "who wrote it?\n\n  when was it built?  \n") == ["who wrote it?", "when was it built?"]
    assert read("q.jsonl", '{"question": "who?", "answers": ["x"]}\n"what?"\n\n') == ["who?", "what?"]
    many = read("many.txt", "".join(f"question {i}?\n" for i in range(5000)), "index.recall_queries=10")
    assert len(many) == 1024 and len(set(many)) == 1024 and many == sorted(many, key=lambda q: int(q[9:-1]))
    for name, body, message in [
        ("bad.jsonl", '{"question": "ok"}\n{not json\n', "line 2 is not JSON"),
        ("nofield.jsonl", '{"q": "who?"}\n', 'line 1 has no "question" string'),
        ("empty.txt", "\n \n", "holds no questions"),
        ("latin1.txt", b"caf\xe9?\n", "is not UTF-8 text"),
    ]:
        with pytest.raises(ConfigError, match=f"index.recall_questions: .*{message}"):
            read(name, body)
    with pytest.raises(ConfigError, match="index.recall_questions: cannot read .*missing.txt"):
        read_recall_questions(load_config(None, [f"index.recall_questions={tmp_path}/missing.txt"]))


def test_training_budget_follows_the_running_driver_memory():
    cfg = load_config(None, [])
    assert cfg.train_budget_bytes() == 512 * 2**20, "Spark's default 1g, halved"
    assert cfg.train_budget_bytes("16g") == 8 * 2**30, "spark-submit --driver-memory 16g"
    cfg = load_config(None, ["spark.conf={spark.driver.memory: 4g}"])
    assert cfg.train_budget_bytes() == 2 * 2**30 and cfg.train_budget_bytes("6g") == 3 * 2**30
    assert load_config(None, ["index.max_train_bytes=1000000"]).train_budget_bytes("16g") == 1_000_000
