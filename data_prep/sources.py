"""The sources YAML: which URL lists to download, how, how to filter, and where the MDS goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from pipeline.config.loader import check, load


@dataclass
class Img2DatasetOptions:
    """Passed to `img2dataset.download` as keyword arguments."""

    image_size: int = 256
    resize_mode: str = "keep_ratio"
    # keep_ratio alone enlarges small images; this keeps them as they are.
    resize_only_if_bigger: bool = True
    encode_quality: int = 95
    processes_count: int = 2
    thread_count: int = 32
    number_sample_per_shard: int = 10000
    timeout: int = 10
    retries: int = 0
    min_image_size: int = 0
    # pyspark: the shards are Spark tasks of the build's session (local[*] or a cluster), sent
    # subjob_size at a time; multiprocessing: processes_count processes on this machine.
    distributor: str = "pyspark"
    subjob_size: int = 1000


@dataclass
class ClipScoreConfig:
    """Score every downloaded pair with a CLIP model (data_prep/clip_score.py); the score is kept
    as the `clip_score` column of the stream, and rows it filters out counted as low_clip_score."""

    # An open_clip model name (with `pretrained`), or local-dir:FOLDER (pipeline/export.py's output).
    model: str = MISSING
    pretrained: Optional[str] = None  # weights for a model name: a local file or an open_clip tag
    min: Optional[float] = None  # keep pairs whose cosine is at least this (LAION-2B: 0.28 with ViT-B/32)
    # keep this share of the pairs that pass the other filters, the best scored (DataComp: 0.3)
    top_fraction: Optional[float] = None
    batch_size: int = 64
    device: str = "cpu"  # where the executors run the model: cpu, or cuda on GPU executors

    def __post_init__(self):
        fraction = self.top_fraction
        check(fraction is None or 0 < fraction <= 1, f"clip_score.top_fraction must be in (0, 1], got {fraction}")
        check(self.batch_size >= 1, f"clip_score.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class SemanticDedupConfig:
    """SemDeDup (data_prep/curation.py): k-means on the CLIP-score stage's image embeddings, then in
    each cluster a row whose cosine with an earlier row (source order) reaches `threshold` is
    counted as semantic_duplicate; the first is kept. Needs filters.clip_score (its embeddings)."""

    threshold: float = 0.95
    # k-means clusters; each cluster's rows are compared pairwise in one task (SemDeDup: 50,000 for LAION-440M).
    clusters: int = 8
    seed: int = 0

    def __post_init__(self):
        check(-1 <= self.threshold <= 1, f"dedup_semantic.threshold is a cosine in [-1, 1], got {self.threshold}")
        check(self.clusters >= 1, f"dedup_semantic.clusters must be >= 1, got {self.clusters}")


NOISE_COLUMNS = (("caption_swapped", "int32"), ("original_caption", "str"))  # what noisy_captions records per row


@dataclass
class NoisyCaptionsConfig:
    """For experiments on curation (bench/EXPERIMENTS.md): the captions of exactly `share` of the
    rows written, chosen by a seeded hash of their keys, are passed on among themselves (each gets
    the next chosen row's), as web data pairs images with text that does not describe them. Each
    row records `caption_swapped` and its `original_caption`."""

    share: float = 0.3
    seed: int = 0

    def __post_init__(self):
        check(0 <= self.share <= 1, f"noisy_captions.share must be in [0, 1], got {self.share}")


@dataclass
class FilterConfig:
    """Every drop is counted under its reason. URL-list filters run before the download, so
    what they drop costs no bandwidth; image filters run on img2dataset's output."""

    # A Spark SQL condition over the URL list's columns (LAION: "punsafe < 0.1 AND
    # similarity >= 0.28"); rows where it is not true are counted as filtered_by_where.
    where: Optional[str] = None
    min_caption_chars: int = 1  # after stripping whitespace; 1 drops empty captions
    dedup_url: bool = True
    min_image_size: int = 0  # smaller side, in pixels, after resizing
    dedup_image_hash: bool = True  # sha256 of the downloaded bytes (see dedup_across_sources)
    clip_score: Optional[ClipScoreConfig] = None
    dedup_semantic: Optional[SemanticDedupConfig] = None

    def __post_init__(self):
        check(
            self.dedup_semantic is None or self.clip_score is not None,
            "filters.dedup_semantic compares the image embeddings of filters.clip_score: set a clip_score model",
        )


URL_FORMATS = ("parquet", "csv", "tsv", "jsonl", "coco_captions")
HELD_FORMATS = ("webdataset", "imagefolder", "parquet")  # parquet: with image_column


@dataclass
class SourceConfig:
    # A URL list to download: one file or a folder of them, local or s3://. input_format: parquet,
    # csv, tsv, jsonl, or coco_captions (a COCO captions JSON: images[].coco_url,
    # annotations[].caption; one row per image, every caption kept).
    url_list: Optional[str] = None
    # Or images already held (data_prep/held.py), nothing downloaded: input_format webdataset (a
    # folder or s3:// prefix of tar shards, e.g. img2dataset's or DataComp's output), imagefolder
    # (images with a metadata.csv/.jsonl or a .txt caption beside each), or parquet with image_column.
    path: Optional[str] = None
    input_format: str = "parquet"
    url_col: str = "url"
    caption_col: str = "caption"
    # parquet only: the column of image bytes (binary, or Hugging Face's {bytes, path} struct).
    image_column: Optional[str] = None
    # Extra URL-list columns carried into MDS, with their MDS type (e.g. {label: int}).
    extra_columns: dict[str, str] = field(default_factory=dict)
    # More captions of each image (synthetic recaptions, ...): columns kept in MDS as text beside
    # `caption` (a missing one as ""); the training YAML's data.captions picks among them per epoch.
    caption_columns: list[str] = field(default_factory=list)
    img2dataset: Img2DatasetOptions = field(default_factory=Img2DatasetOptions)
    filters: FilterConfig = field(default_factory=FilterConfig)
    noisy_captions: Optional[NoisyCaptionsConfig] = None
    # Where this source's MDS stream goes: a local folder or s3://bucket/prefix.
    out: str = MISSING

    @property
    def held(self) -> bool:
        """Whether the images come with the source (no download)."""
        return self.input_format in ("webdataset", "imagefolder") or self.image_column is not None

    def __post_init__(self):
        overlap = set(self.caption_columns) & {*self.extra_columns, "caption", "captions"}
        check(not overlap, f"caption_columns {sorted(overlap)} are also extra_columns, or the stream's own caption(s)")
        formats = sorted({*URL_FORMATS, *HELD_FORMATS})
        check(self.input_format in formats, f"input_format '{self.input_format}' is not one of {', '.join(formats)}")
        check(
            self.image_column is None or self.input_format == "parquet",
            f"image_column is for input_format parquet, not {self.input_format}",
        )
        check(not (self.held and self.noisy_captions), "noisy_captions is for URL-list sources (applied to the list)")
        if self.held:
            check(
                self.path is not None and self.url_list is None,
                f"input_format {self.input_format}: set path, not url_list",
            )
        else:
            check(
                self.url_list is not None and self.path is None,
                "a URL list source needs url_list (path is for images held)",
            )

    @property
    def carried_columns(self) -> dict:
        """The input's columns kept in the stream besides url and caption, with their MDS types."""
        return {**self.extra_columns, **{column: "str" for column in self.caption_columns}}

    @property
    def recorded_columns(self) -> dict:
        """Every column the stream keeps besides the base ones: the carried ones, and what the
        caption noise records."""
        return {**self.carried_columns, **(dict(NOISE_COLUMNS) if self.noisy_captions else {})}

    @property
    def input(self) -> str:
        """The URL list, or the data held."""
        return self.path if self.held else self.url_list


@dataclass
class SampleConfig:
    """The built-in sample: real images from Debian packages, served on loopback."""

    emoji_test_every: int = 10  # every Nth emoji is held out for evaluation
    fashion_train: int = 5000
    fashion_test: int = 1000
    # Bad rows added to each training source's URL list, so the accounting is exercised.
    missing_urls: int = 8
    corrupt_images: int = 4
    empty_captions: int = 4
    duplicate_urls: int = 4
    # Planted in the web list for `make demo`'s curation step: resized, re-encoded copies of training
    # emoji (other bytes: only semantic dedup finds them), and held-out emoji copied into training,
    # half as the same file and half re-encoded (eval_overlap by sha256, and by embedding).
    near_duplicates: int = 6
    eval_copies: int = 4
    seed: int = 0
    # The loopback port it is served on. Fixed, so a re-run serves the same URLs and resumes.
    port: int = 18080


@dataclass
class SparkConfig:
    """The Spark session `make shards` runs on. SPARK_MASTER in the environment wins over master."""

    master: str = "local[*]"  # or spark://host:7077 for a standalone cluster
    driver_memory: str = "2g"
    # Any other Spark setting, e.g. {spark.executor.memory: 8g, spark.sql.shuffle.partitions: 2000}
    conf: dict[str, str] = field(default_factory=dict)


@dataclass
class DecontaminateConfig:
    """Training rows whose image is in an eval set are dropped as eval_overlap, and listed (with the
    eval image) in the source's summary: the same bytes (sha256) for every source, and an image
    embedding within `threshold` cosine for the sources with filters.clip_score (that model embeds
    the eval images too)."""

    eval_sets: list[str] = field(default_factory=list)  # eval MDS streams (data_prep/eval_sets.py converts others)
    threshold: float = 0.95

    def __post_init__(self):
        check(bool(self.eval_sets), "decontaminate.eval_sets is empty: list the eval MDS streams to keep out")


@dataclass
class SourcesConfig:
    # Deduplicated URL lists and img2dataset outputs (the staging area; local, or s3:// on a
    # cluster) and the sample's served files live here; safe to delete once the streams exist.
    work_dir: str = "data/_work"
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    spark: SparkConfig = field(default_factory=SparkConfig)
    # Image-hash (and semantic) dedup over all sources: an image is kept in the first source (YAML order)
    # that has it. Semantic dedup across sources takes the first source's settings and needs one model.
    dedup_across_sources: bool = False
    decontaminate: Optional[DecontaminateConfig] = None
    # Set only for the built-in sample: its URL lists are generated and served before download.
    sample: Optional[SampleConfig] = None


def load_sources(path: str, overrides=()) -> SourcesConfig:
    return load(SourcesConfig, path, overrides)
