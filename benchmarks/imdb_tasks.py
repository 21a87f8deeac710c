"""Builds a pairs task and a multi-label task from IMDb reviews (columns text, label, rating), for peft_qlora.py.

    python benchmarks/imdb_tasks.py ../shared/data/imdb/train.parquet ../shared/data/imdb/test.parquet --out DIR

For each input file NAME.parquet it writes:
- DIR/pairs_NAME.parquet: columns text, text_pair, label. Each review (text) is paired with another review of the
  same file (text_pair), drawn at random: of the same sentiment for half of the rows, of the other for the rest;
  label "same" or "different". The model must read both texts: neither alone tells the label.
  Train with --text-column text text_pair.
- DIR/multilabel_NAME.parquet: columns text, labels. Each review's labels from its 1-10 star rating: "pos" (7 or
  more) or "neg" (4 or less), and "strong" for the far ends of the scale (1, 2, 9 or 10): one or two labels per
  review, from three. Train with --label-column labels.
Regression needs no builder: --label-column rating --task regression reads the rating itself.
"""
import argparse
import os
import random


def pairs(texts: list[str], labels: list[int], seed: int) -> dict:
    """Each review with another of the same sentiment (half the rows, at random) or of the other."""
    rng = random.Random(seed)
    same = {y: [i for i, label in enumerate(labels) if label == y] for y in set(labels)}
    other = {y: [i for i, label in enumerate(labels) if label != y] for y in set(labels)}
    rows = {"text": [], "text_pair": [], "label": []}
    for i, y in enumerate(labels):
        pool = same[y] if rng.random() < 0.5 else other[y]
        j = rng.choice(pool)
        while j == i:  # another review, not the same one twice
            j = rng.choice(pool)
        rows["text"].append(texts[i])
        rows["text_pair"].append(texts[j])
        rows["label"].append("same" if labels[j] == y else "different")
    return rows


def rating_labels(rating: int) -> list[str]:
    """A review's labels from its star rating: its sentiment, and "strong" at either end of the scale."""
    return ["pos" if rating >= 7 else "neg"] + (["strong"] if rating <= 2 or rating >= 9 else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="IMDb parquet files with columns text, label and rating")
    parser.add_argument("--out", required=True, help="folder for the task files")
    parser.add_argument("--seed", type=int, default=0, help="seed for the pairing")
    args = parser.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(args.out, exist_ok=True)
    for path in args.files:
        table = pq.read_table(path, columns=["text", "label", "rating"]).to_pydict()
        name = os.path.splitext(os.path.basename(path))[0]
        pq.write_table(pa.table(pairs(table["text"], table["label"], args.seed)),
                       os.path.join(args.out, f"pairs_{name}.parquet"))
        pq.write_table(pa.table({"text": table["text"], "labels": [rating_labels(r) for r in table["rating"]]}),
                       os.path.join(args.out, f"multilabel_{name}.parquet"))
        print(f"{path}: {len(table['text'])} rows -> {args.out}/pairs_{name}.parquet, multilabel_{name}.parquet")


if __name__ == "__main__":
    main()
