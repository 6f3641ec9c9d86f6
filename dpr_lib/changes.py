"""Passages snapshots and change sets as Spark tables, for the nightly job: the diff of a snapshot
against the previous live Passages, the live rows of a chain of Passages tables under tombstones,
change sets (upserts and deletes), and this run's merged Embeddings table (the next run's baseline).
Nothing here collects a table onto the driver."""

from __future__ import annotations

from dpr_lib import storage
from dpr_lib.config import join_url
from dpr_lib.errors import InputError


def diff_passages(spark, new_url: str, old=None) -> dict:
    """Counts of new / changed / unchanged / deleted passages (by pid and content_hash); ``old``:
    the previous live Passages (a DataFrame with pid, content_hash), None on a first run."""
    from pyspark.sql import functions as F

    new = spark.read.parquet(storage.resolve_table(new_url)).select("pid", F.col("content_hash").alias("h_new"))
    if old is None:
        return {"new": new.count(), "changed": 0, "unchanged": 0, "deleted": 0}
    old = old.select("pid", F.col("content_hash").alias("h_old"))
    row = (new.join(old, "pid", "full_outer").agg(
        F.sum(F.when(F.col("h_old").isNull(), 1).otherwise(0)).alias("new"),
        F.sum(F.when(F.col("h_new").isNull(), 1).otherwise(0)).alias("deleted"),
        F.sum(F.when(F.col("h_new") == F.col("h_old"), 1).otherwise(0)).alias("unchanged"),
        F.sum(F.when(F.col("h_new") != F.col("h_old"), 1).otherwise(0)).alias("changed")).first())
    return {k: int(row[k] or 0) for k in ("new", "changed", "unchanged", "deleted")}


def passages_chain(baseline: dict) -> list[dict]:
    """The previous run's Passages as tables [{url, seq}]: one full table, or (after change-set runs)
    a full table and the delta tables that followed it, aligned with the index's segments."""
    p = baseline["passages"]
    return [{"url": p, "seq": 0}] if isinstance(p, str) else list(p)


def live_passages(spark, chain: list[dict], tombstones):
    """The live rows of a Passages chain: a row of the table with seq s is dead when its pid is
    tombstoned with a later seq (the index's rule, ``dpr_lib.segments``). ``tombstones``: [n, 2]
    int64 (pid, seq) rows, joined by broadcast (as many as the changes since the last compaction)."""
    from pyspark.sql import functions as F

    frames = [spark.read.parquet(storage.resolve_table(e["url"])).withColumn("_seq", F.lit(int(e["seq"])))
              for e in chain]
    df = frames[0]
    for f in frames[1:]:
        df = df.unionByName(f)
    if len(chain) > 1 and len(tombstones):
        import pyarrow as pa

        t = spark.createDataFrame(pa.table({"pid": tombstones[:, 0], "_tseq": tombstones[:, 1]}).to_pandas())
        df = df.join(F.broadcast(t), "pid", "left").where(F.col("_tseq").isNull() | (F.col("_tseq") <= F.col("_seq"))) \
            .drop("_tseq")
    return df.drop("_seq")


def read_changes(spark, url: str):
    """A change set: rows with ``op`` (upsert | delete), ``id``, and for upserts ``title``, ``text``;
    JSON Lines, Parquet, or ``table:<name>`` (e.g. a Delta/Iceberg change feed read as a table).
    Returns (upserts DataFrame [id, title, text], deleted ids DataFrame [doc_id], counts)."""
    from pyspark.sql import functions as F

    if url.startswith("table:"):
        name = url[len("table:"):]
        if not spark.catalog.tableExists(name):
            raise InputError(f"nightly.changes names table {name!r}, which is not in the session's catalog")
        df = spark.table(name)
    else:
        files = storage.list_files(url) if storage.exists(url) else []
        if not files:
            raise InputError(f"nightly.changes: no change set at {url}")
        df = spark.read.parquet(*files) if all(f.endswith(".parquet") for f in files) else spark.read.json(files)
    missing = [c for c in ("op", "id") if c not in df.columns]
    if missing:
        raise InputError(f"nightly.changes {url}: the change set lacks column(s) {missing}; expected op "
                         f"(upsert | delete), id, title, text; got {df.columns}")
    op = F.lower(F.trim(F.col("op").cast("string")))
    df = df.withColumn("op", op).withColumn("id", F.col("id").cast("string"))
    bad = df.where(F.col("op").isNull() | ~F.col("op").isin("upsert", "delete") | F.col("id").isNull())
    n_bad = bad.count()
    if n_bad:
        sample = [r.asDict() for r in bad.select("op", "id").limit(3).collect()]
        raise InputError(f"nightly.changes {url}: {n_bad} row(s) with an op other than upsert / delete or no id "
                         f"(e.g. {sample}); nothing was published")
    both = df.groupBy("id").agg(F.countDistinct("op").alias("ops")).where(F.col("ops") > 1)
    conflicts = [r["id"] for r in both.limit(5).collect()]
    if conflicts:
        raise InputError(f"nightly.changes {url}: document(s) {conflicts} are both upserted and deleted in one change "
                         "set; send one op per document")
    cols = [F.col("id"), F.col("title") if "title" in df.columns else F.lit(None).cast("string").alias("title"),
            F.col("text") if "text" in df.columns else F.lit(None).cast("string").alias("text")]
    upserts = df.where(F.col("op") == "upsert").select(*cols)
    deletes = df.where(F.col("op") == "delete").select(F.col("id").alias("doc_id")).distinct()
    return upserts, deletes


def merge_embeddings(spark, run_dir: str, df_fn, fingerprint: dict) -> str:
    """Materialise this run's full Embeddings table (new + reused) as the next run's baseline, as the
    DESIGN contract's table, like the encode job writes it: files of disjoint pid ranges, sorted by
    pid, fixed-size float32 vectors, the encoder fingerprint in each file's metadata (so
    :func:`~dpr_lib.encode.check_embeddings` accepts them; Spark's own writer drops both)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark import TaskContext

    from dpr_lib import schemas
    from dpr_lib.encode import embeddings_batch, embeddings_metadata
    from dpr_lib.index_ops import vectors_of

    url = join_url(run_dir, "embeddings")
    fs, path = storage.get_fs(url)
    if fs.exists(path):  # a crashed attempt's files: rewritten whole
        fs.rm(path, recursive=True)
    dim = int(fingerprint["dim"])
    metadata = embeddings_metadata(fingerprint, "nightly-merge")

    def write(batches):
        # Built in the task: a pickled pyarrow schema loses the list element's non-nullability.
        schema = schemas.embeddings_schema(dim).with_metadata(metadata)
        out_url = join_url(url, f"part-{TaskContext.get().partitionId():05d}.parquet")
        rows = 0
        with storage.StagedFile(out_url, prefix="dpr-emb-") as staged:
            with pq.ParquetWriter(staged.path, schema) as writer:
                for b in batches:
                    if not b.num_rows:
                        continue
                    writer.write_batch(embeddings_batch(b.column("pid").cast(pa.int64()), b.column("content_hash"),
                                                        vectors_of(b, dim), schema))
                    rows += b.num_rows
            staged.skip = not rows
        yield pa.RecordBatch.from_pylist([{"rows": rows}])

    parts = max(1, spark.sparkContext.defaultParallelism)
    (df_fn().select("pid", "content_hash", "vector").repartitionByRange(parts, "pid").sortWithinPartitions("pid")
     .mapInArrow(write, "rows long").collect())
    return url


def run_passages(run_dir: str, changes: str | None) -> str:
    """The run's full Passages table: the snapshot's, or with a change set the one a full build wrote."""
    return join_url(run_dir, "passages_full" if changes else "passages")


def full_passages(spark, run_dir: str, live) -> str:
    """Every live passage after a change set: the previous live rows of documents it does not name,
    plus the run's; pid-sorted files of disjoint ranges (the docstore copies them in order)."""
    url = run_passages(run_dir, "changes")
    ids = spark.read.parquet(join_url(run_dir, "changes", "affected")).select("doc_id")
    new = spark.read.parquet(storage.resolve_table(join_url(run_dir, "passages")))
    from pyspark.sql import functions as F

    full = live.join(F.broadcast(ids), "doc_id", "left_anti").select(*new.columns).unionByName(new)
    parts = max(1, spark.sparkContext.defaultParallelism)
    full.repartitionByRange(parts, "pid").sortWithinPartitions("pid").write.mode("overwrite").parquet(url)
    return url
