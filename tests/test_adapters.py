"""Real-data adapters: MovieLens-100K, Amazon ratings, AliExpress and Ali-CCP -> canonical ShopData."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.datasets.alibaba import load_ali_ccp, load_aliexpress
from shared.datasets.amazon import load_amazon_ratings
from shared.datasets.movielens import (
    GENRE_GROUPS,
    GENRES,
    REGION_GROUPS,
    load_movielens,
    sample_negatives,
    weekly_sales,
)
from shared.schema import INTERACTION_COLUMNS, ShopData, ShopDataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ML = DATA / "movielens-100k"
AMAZON = DATA / "amazon-ratings" / "ratings.csv"
ALIEXPRESS = DATA / "aliexpress-sample"
ALI_CCP = DATA / "ali-ccp-sample"


def need(path: Path) -> Path:
    """Skip the test when the shared real-data folder is absent (as on a user's machine)."""
    if not path.exists():
        pytest.skip(f"real data not available at {path} (../shared/data is not shipped with the repo)")
    return path


def check_canonical(shop: ShopData) -> None:
    """Canonical dtypes and label invariants every adapter must meet."""
    inter = shop.interactions
    assert list(inter.columns[: len(INTERACTION_COLUMNS)]) == list(INTERACTION_COLUMNS)
    assert pd.api.types.is_string_dtype(inter["user_id"]) and pd.api.types.is_string_dtype(inter["item_id"])
    assert inter["timestamp"].dtype == np.int64
    for label in ("clicked", "carted", "purchased"):
        assert inter[label].dtype == np.int8 and set(inter[label].unique()) <= {0, 1}
    assert inter["quantity"].dtype == np.float32
    assert (inter["purchased"] <= inter["clicked"]).all(), "purchase must imply click"
    assert (inter["carted"] >= inter["purchased"]).all()
    assert (inter["quantity"] == inter["purchased"]).all()
    assert inter["timestamp"].is_monotonic_increasing
    if shop.items is not None:
        assert shop.items["item_id"].is_unique and pd.api.types.is_string_dtype(shop.items["item_id"])
        assert inter["item_id"].isin(shop.items["item_id"]).all()
    if shop.users is not None:
        assert shop.users["user_id"].is_unique and pd.api.types.is_string_dtype(shop.users["user_id"])
        assert inter["user_id"].isin(shop.users["user_id"]).all()
    if shop.sales is not None:
        sales = shop.sales
        assert pd.api.types.is_string_dtype(sales["item_id"])
        assert (sales["day"].dtype, sales["units"].dtype, sales["promo"].dtype) == (np.int32, np.float32, np.int8)
        assert ((sales["day"] + 3) % 7 == 0).all(), "weeks start on Monday"
        assert sales["units"].sum() == inter["clicked"].sum(), "weekly units count every rating once"


def check_negatives(shop: ShopData, per_positive: int) -> None:
    """Sampled impressions never hit an item the user rated, and sit at their rating's timestamp."""
    inter = shop.interactions
    pos, neg = inter[inter["clicked"] == 1], inter[inter["clicked"] == 0]
    catalog = len(shop.items) if shop.items is not None else pos["item_id"].nunique()
    has_free = pos.groupby("user_id")["item_id"].transform("nunique") < catalog  # else nothing to sample
    assert len(neg) == per_positive * int(has_free.sum())
    user = pd.factorize(inter["user_id"])[0].astype(np.int64)
    item = pd.factorize(inter["item_id"])[0].astype(np.int64)
    is_pos = (inter["clicked"] == 1).to_numpy()
    pair = user * (item.max() + 1) + item
    assert not np.isin(pair[~is_pos], pair[is_pos]).any(), "a negative hit a rated item"
    moment = user * (1 << 32) + inter["timestamp"].to_numpy()
    assert np.isin(moment[~is_pos], moment[is_pos]).all(), "a negative is not at one of its user's ratings"


# ---------------------------------------------------------------- MovieLens on the real sample

@pytest.fixture(scope="module")
def ml_region() -> list[ShopData]:
    return load_movielens(need(ML), split_by="region")


@pytest.fixture(scope="module")
def ml_genre() -> list[ShopData]:
    return load_movielens(need(ML), split_by="genre")


def test_movielens_region_shops(ml_region: list[ShopData]) -> None:
    assert [s.name for s in ml_region] == list(REGION_GROUPS)
    positives = [int(s.interactions["clicked"].sum()) for s in ml_region]
    users = [len(s.users) for s in ml_region]
    assert sum(positives) == 100_000 and sum(users) == 943
    assert min(users) >= 150 and min(positives) >= 15_000, "every region shop has a usable size"
    first = ml_region[0].items
    assert len(first) == 1682 and (first["global_key"] == first["item_id"]).all()
    for shop in ml_region:
        check_canonical(shop)
        check_negatives(shop, 1)
        pd.testing.assert_frame_equal(shop.items, first)  # one catalog, shared by every region shop
        assert shop.available_tasks() == ["ctr", "cvr", "ranking", "sales"]
        assert shop.meta["source"] == "movielens-100k" and shop.meta["split_by"] == "region"
    all_users = pd.concat([s.users for s in ml_region])
    assert all_users["user_id"].is_unique, "a user lives in exactly one region shop"
    assert set(all_users["age_bucket"]) <= {"<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    assert set(all_users["gender"]) == {"M", "F"}
    canadian = all_users[~all_users["region"].str.isdigit()]
    assert len(canadian) == 18 and set(ml_region[3].users["user_id"]) >= set(canadian["user_id"])


def test_movielens_genre_shops(ml_genre: list[ShopData]) -> None:
    assert [s.name for s in ml_genre] == list(GENRE_GROUPS)
    catalogs = [set(s.items["item_id"]) for s in ml_genre]
    assert sum(len(c) for c in catalogs) == len(set().union(*catalogs)) == 1682, "catalogs are disjoint"
    assert sum(int(s.interactions["clicked"].sum()) for s in ml_genre) == 100_000
    for shop, genres in zip(ml_genre, GENRE_GROUPS.values(), strict=True):
        check_canonical(shop)
        check_negatives(shop, 1)
        assert shop.available_tasks() == ["ctr", "cvr", "ranking", "sales"]
        primary = shop.items["category"].str.removeprefix("Movies>").replace("Unknown", "unknown")
        assert set(primary) <= set(genres)
    toy_story = ml_genre[3].items.set_index("item_id").loc["1"]  # Animation Children's Comedy
    assert toy_story["category"] == "Movies>Animation" and toy_story["item_year"] == 1995


def test_movielens_determinism(ml_region: list[ShopData]) -> None:
    again = load_movielens(ML, split_by="region", seed=0)
    other = load_movielens(ML, split_by="region", seed=1)
    for a, b, c in zip(ml_region, again, other, strict=True):
        for column in a.interactions.columns:
            assert (a.interactions[column].to_numpy() == b.interactions[column].to_numpy()).all(), column
        assert (a.sales["units"].to_numpy() == b.sales["units"].to_numpy()).all()
        changed = a.interactions["item_id"].to_numpy() != c.interactions["item_id"].to_numpy()
        is_pos = a.interactions["clicked"].to_numpy() == 1
        assert not changed[is_pos].any() and changed[~is_pos].mean() > 0.9, "another seed redraws only negatives"


# ---------------------------------------------------------------- MovieLens from tiny synthetic files

FLAGS = {  # movie id -> genres (GroupLens order matters only for the primary genre)
    1: ("Animation", "Children's", "Comedy"), 2: ("Action", "Adventure", "Thriller"), 3: ("Thriller",),
    4: ("Comedy", "Romance"), 5: ("Drama",), 6: ("Drama", "War"), 7: ("Crime", "Drama"), 8: ("Horror",),
    9: ("Documentary",), 10: ("Children's", "Musical"), 11: ("Sci-Fi",), 12: ("Comedy",), 13: ("unknown",),
    14: ("Western",),
}
ZIPS = ["01234", "12345", "23456", "34567", "45678", "56789", "67890", "78901", "89012", "90123", "T8H1N",
        "v5a2b"]
AGES = [7, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56]


def synthetic_movielens() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Ratings (every user rates 6 movies at distinct times), movies and users."""
    rng = np.random.default_rng(7)
    rows = []
    for u in range(1, len(ZIPS) + 1):
        for j, m in enumerate(rng.choice(list(FLAGS), size=6, replace=False)):
            rows.append((u, int(m), int(rng.integers(1, 6)), 880_000_000 + 86_400 * (3 * j + u)))
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "ts"])
    movies = pd.DataFrame({"item": list(FLAGS), "title": [f"Film {m}" for m in FLAGS],
                           "year": [1990 + m for m in FLAGS]})
    movies.loc[0, "title"] = "Café Crème"  # latin-1 in u.item
    users = pd.DataFrame({"user": range(1, len(ZIPS) + 1), "age": AGES,
                          "gender": ["M", "F"] * 6, "occupation": ["writer"] * 12, "zip": ZIPS})
    return ratings, movies, users


def write_grouplens(folder: Path, *, missing_date_item: int | None = None) -> Path:
    """The synthetic set in the original GroupLens layout."""
    ratings, movies, users = synthetic_movielens()
    folder.mkdir(parents=True, exist_ok=True)
    ratings.to_csv(folder / "u.data", sep="\t", header=False, index=False)
    lines = []
    for m, title, year in movies.itertuples(index=False):
        date = "" if m == missing_date_item else f"01-Jan-{year}"
        flags = "|".join("1" if g in FLAGS[m] else "0" for g in GENRES)
        lines.append(f"{m}|{title} ({year})|{date}||http://x/{m}|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    users.to_csv(folder / "u.user", sep="|", header=False, index=False)
    return folder


def write_recbole(folder: Path) -> Path:
    """The same synthetic set as RecBole atomic files."""
    ratings, movies, users = synthetic_movielens()
    folder.mkdir(parents=True, exist_ok=True)
    ratings.set_axis(["user_id:token", "item_id:token", "rating:float", "timestamp:float"], axis=1).to_csv(
        folder / "ml-100k.inter", sep="\t", index=False)
    pd.DataFrame({"item_id:token": movies["item"], "movie_title:token_seq": movies["title"],
                  "release_year:token": movies["year"],
                  "class:token_seq": [" ".join(FLAGS[m]) for m in movies["item"]]}).to_csv(
        folder / "ml-100k.item", sep="\t", index=False)
    users.set_axis(["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"],
                   axis=1).to_csv(folder / "ml-100k.user", sep="\t", index=False)
    return folder


@pytest.mark.parametrize("split_by", ["region", "genre"])
def test_grouplens_and_recbole_layouts_give_the_same_shops(tmp_path: Path, split_by: str) -> None:
    original = load_movielens(write_grouplens(tmp_path / "gl"), split_by=split_by, seed=3)
    atomic = load_movielens(write_recbole(tmp_path / "rb"), split_by=split_by, seed=3)
    assert [s.meta["format"] for s in original + atomic] == ["grouplens"] * len(original) + ["recbole"] * len(atomic)
    assert [s.name for s in original] == [s.name for s in atomic]
    for a, b in zip(original, atomic, strict=True):
        check_canonical(a)
        check_negatives(a, 1)
        for table in ("interactions", "items", "users", "sales"):
            pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table))


def test_grouplens_region_and_side_fields(tmp_path: Path) -> None:
    shops = load_movielens(write_grouplens(tmp_path, missing_date_item=5), split_by="region")
    assert [s.name for s in shops] == list(REGION_GROUPS)
    users = pd.concat([s.users for s in shops]).set_index("user_id")
    assert users.loc["1", "age_bucket"] == "<18" and users.loc["3", "age_bucket"] == "18-24"
    assert users.loc["4", "age_bucket"] == "25-34" and users.loc["12", "age_bucket"] == "56+"
    assert users.loc["11", "region"] == "T" and users.loc["12", "region"] == "V"
    by_shop = {s.name: set(s.users["user_id"]) for s in shops}
    assert by_shop["ml-zip0-1"] == {"1", "2"} and by_shop["ml-zip8-9"] == {"9", "10"}
    assert by_shop["ml-zip6-7"] == {"7", "8", "11", "12"}, "non-numeric postal codes join the 6-7 shop"
    items = shops[0].items.set_index("item_id")
    assert np.isnan(items.loc["5", "item_year"]) and items.loc["6", "item_year"] == 1996
    assert items.loc["13", "category"] == "Movies>Unknown" and items.loc["7", "category"] == "Movies>Crime"


def test_genre_shops_follow_primary_genre(tmp_path: Path) -> None:
    shops = {s.name: s for s in load_movielens(write_grouplens(tmp_path), split_by="genre", negatives_per_positive=3)}
    catalog = {name: set(s.items["item_id"]) for name, s in shops.items()}
    assert catalog["ml-family"] == {"1", "10"} and catalog["ml-drama"] == {"5", "6", "13"}
    assert catalog["ml-crime-horror"] == {"7", "8", "9", "14"}
    for shop in shops.values():
        check_canonical(shop)
        check_negatives(shop, 3)
        assert shop.interactions.loc[shop.interactions["clicked"] == 0, "item_id"].isin(catalog[shop.name]).all()


def test_movielens_thresholds_and_no_negatives(tmp_path: Path) -> None:
    folder = write_grouplens(tmp_path)
    shops = load_movielens(folder, negatives_per_positive=0, rating_threshold=5)
    ratings = synthetic_movielens()[0]
    inter = pd.concat([s.interactions for s in shops])
    assert len(inter) == len(ratings) and (inter["clicked"] == 1).all()
    assert inter["purchased"].sum() == (ratings["rating"] >= 5).sum()
    assert all("ctr" not in s.available_tasks() for s in shops)


@pytest.mark.parametrize(("file", "text", "expected"), [
    ("u.data", "1\t1\tfive\t880000000\n", "u.data, row 1, column 'rating'"),
    ("u.data", "1\t1\t4\t880000000\n1\t99\t4\t880000000\n", "u.data, row 2, column 'item_id': item_id '99'"),
    ("u.data", "1\t1\t4\t880000000\n77\t1\t4\t880000000\n", "row 2, column 'user_id'"),
    ("u.data", "1\t1\t4\t880000000\n1\t2\t4\t880000000\t9\n", "u.data, row 2: expected 4 fields, found 5"),
    ("u.data", "1\t1\t4\t-5\n", "column 'timestamp'"),
    ("u.user", "1|24|M|writer|01234\n1|30|F|writer|12345\n", "u.user, row 2, column 'user_id': duplicate"),
])
def test_movielens_grouplens_errors(tmp_path: Path, file: str, text: str, expected: str) -> None:
    folder = write_grouplens(tmp_path)
    (folder / file).write_text(text)
    with pytest.raises(ShopDataError, match=expected.replace("(", r"\(")):
        load_movielens(folder)


def test_movielens_recbole_errors(tmp_path: Path) -> None:
    folder = write_recbole(tmp_path)
    (folder / "ml-100k.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t880000000\n")
    with pytest.raises(ShopDataError, match=r"ml-100k.inter, column 'rating': missing field 'rating'"):
        load_movielens(folder)
    write_recbole(folder)
    item = folder / "ml-100k.item"
    item.write_text(item.read_text().replace("Sci-Fi", "SciFi"))
    with pytest.raises(ShopDataError, match=r"ml-100k.item, row \d+, column 'class': unknown genre 'SciFi'"):
        load_movielens(folder)


def test_movielens_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ShopDataError, match="no MovieLens files found.*ml-100k.inter.*u.data"):
        load_movielens(tmp_path)
    with pytest.raises(ShopDataError, match="not a folder"):
        load_movielens(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split_by"):
        load_movielens(write_grouplens(tmp_path), split_by="zip")


# ---------------------------------------------------------------- the shared rating-log helpers

def test_sample_negatives_is_exact() -> None:
    rng = np.random.default_rng(0)
    # user 0 rated items 0..3 of 5 (only item 4 free); user 1 rated everything; user 2 rated item 2.
    users = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2])
    items = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 2])
    rows, negatives = sample_negatives(users, items, 5, 200, rng)
    assert set(users[rows]) == {0, 2}, "a user who rated the whole catalog gets no negatives"
    assert (negatives[users[rows] == 0] == 4).all()
    assert len(rows) == 200 * 5
    drawn = negatives[users[rows] == 2]
    assert set(drawn) == {0, 1, 3, 4}, "every free item can be drawn"
    assert np.bincount(drawn, minlength=5)[[0, 1, 3, 4]].min() > 30, "roughly uniform over free items"


def test_weekly_sales_fills_zero_weeks() -> None:
    monday = 4 * 86_400  # 1970-01-05
    ts = np.array([monday, monday + 86_400, monday + 3 * 7 * 86_400, monday + 7 * 86_400])
    sales = weekly_sales(pd.Series(["a", "a", "a", "b"]), ts)
    assert sales["item_id"].tolist() == ["a", "a", "a", "a", "b", "b", "b"]
    assert sales["day"].tolist() == [4, 11, 18, 25, 11, 18, 25]
    assert sales["units"].tolist() == [2, 0, 0, 1, 1, 0, 0]


# ---------------------------------------------------------------- Amazon ratings

def test_amazon_single_shop() -> None:
    (shop,) = load_amazon_ratings(need(AMAZON), name="beauty")
    assert shop.name == "beauty" and shop.items is None and shop.users is None
    check_canonical(shop)
    check_negatives(shop, 1)
    inter = shop.interactions
    assert int(inter["clicked"].sum()) == 63_836
    assert inter["user_id"].nunique() == 8_072 and inter.loc[inter["clicked"] == 1, "item_id"].nunique() == 11_830
    assert shop.available_tasks() == ["ctr", "cvr", "ranking", "sales"]


def test_amazon_split_by_user_hash() -> None:
    shops = load_amazon_ratings(need(AMAZON), n_shops=3, seed=5)
    again = load_amazon_ratings(AMAZON, n_shops=3, seed=5)
    assert [s.name for s in shops] == ["amazon-0", "amazon-1", "amazon-2"]
    user_sets = [set(s.interactions["user_id"]) for s in shops]
    assert sum(map(len, user_sets)) == len(set().union(*user_sets)) == 8_072, "each user in one shop"
    assert all(len(u) > 2_000 for u in user_sets)
    assert "AGZ8SM1BGK3CK" in user_sets[0], "the hash is stable across machines and runs"
    for shop, twin in zip(shops, again, strict=True):
        check_canonical(shop)
        pd.testing.assert_frame_equal(shop.interactions, twin.interactions)
        catalog = set(shop.interactions.loc[shop.interactions["clicked"] == 1, "item_id"])
        assert set(shop.interactions["item_id"]) == catalog, "negatives come from the shop's own catalog"


@pytest.mark.parametrize(("text", "expected"), [
    ("u1,i1,5,1200000000\nu2,i1,4,1200000000,x\n", "row 2: expected 4 fields, found 5"),
    ("u1,i1,5,1200000000\nu2,i1,great,1200000000\n", "row 2, column 'rating': value 'great'"),
    ("u1,i1,7,1200000000\n", "row 1, column 'rating'.*in \\[1"),
    ("u1,i1,5,1200000000.5\n", "row 1, column 'timestamp'.*integer"),
    ("u1,,5,1200000000\n", "row 1, column 'item_id': empty value"),
    ("u1,i1,5\n", "row 1, column 'timestamp'"),
    ("", "no ratings"),
])
def test_amazon_malformed_rows(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(text)
    with pytest.raises(ShopDataError, match=expected):
        load_amazon_ratings(path)


def test_amazon_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("u1,i1,5,1200000000\nu1,i2,2,1200003600\nu2,i3,4,1200007200\nu2,i1,1,1300000000\n")
    (shop,) = load_amazon_ratings(tmp_path / "r.csv", negatives_per_positive=2)
    check_canonical(shop)
    check_negatives(shop, 2)
    assert shop.interactions["purchased"].sum() == 2
    with pytest.raises(ShopDataError, match="file not found"):
        load_amazon_ratings(tmp_path / "missing.csv")


# ---------------------------------------------------------------- AliExpress and Ali-CCP

def test_aliexpress_sample_folder() -> None:
    shop = load_aliexpress(need(ALIEXPRESS), name="ae-sample")
    check_canonical(shop)
    inter = shop.interactions
    assert len(inter) == 120 and (inter["timestamp"].to_numpy() == np.arange(120)).all()
    assert [Path(f).name for f, _ in shop.meta["files"]] == ["aliexpress_train_sample.csv",
                                                              "aliexpress_test_sample.csv"]
    assert (inter["item_id"] == "na").all() and shop.items is None and shop.sales is None
    ctx = [c for c in inter.columns if c.startswith("ctx_")]
    assert sum(pd.api.types.is_string_dtype(inter[c]) for c in ctx) == 16
    assert sum(inter[c].dtype == np.float32 for c in ctx) == 63
    train = pd.read_csv(ALIEXPRESS / "aliexpress_train_sample.csv")
    assert inter["user_id"].iloc[:100].tolist() == train["search_id"].astype(str).tolist()
    assert inter["clicked"].iloc[:100].tolist() == train["click"].tolist()
    assert shop.available_tasks() == ["ctr", "cvr"]
    single = load_aliexpress(ALIEXPRESS / "aliexpress_test_sample.csv", name="ae-test")
    pd.testing.assert_frame_equal(single.interactions.drop(columns="timestamp"),
                                  inter.iloc[100:].reset_index(drop=True).drop(columns="timestamp"))


def test_ali_ccp_sample_folder() -> None:
    shop = load_ali_ccp(need(ALI_CCP), name="ccp-sample")
    check_canonical(shop)
    inter = shop.interactions
    assert len(inter) == 200
    assert [Path(f).name for f, _ in shop.meta["files"]] == ["ali_ccp_train_sample.csv", "ali_ccp_val_sample.csv",
                                                             "ali_ccp_test_sample.csv"]
    train = pd.read_csv(ALI_CCP / "ali_ccp_train_sample.csv")
    assert inter["item_id"].iloc[:100].tolist() == train["205"].astype(str).tolist()
    assert inter["user_id"].iloc[:100].tolist() == train["101"].astype(str).tolist()
    assert "ctx_101" not in inter and "ctx_205" not in inter, "IDs stay local, never shared ctx fields"
    ctx = [c for c in inter.columns if c.startswith("ctx_")]
    assert sum(pd.api.types.is_string_dtype(inter[c]) for c in ctx) == 21
    assert [c for c in ctx if inter[c].dtype == np.float32] == [f"ctx_{c}" for c in train.columns if c[0] == "D"]
    assert shop.available_tasks()[:2] == ["ctr", "cvr"]


def ali_csv(path: Path, labels: list[tuple[str, str]], *, header: str = "click,conversion") -> Path:
    """A tiny AliExpress-format file with the given (click, conversion) label strings."""
    features = ["search_id", *(f"categorical_{i}" for i in range(1, 17)), *(f"numerical_{i}" for i in range(1, 64))]
    lines = [",".join([*features, header])]
    for row, (click, conv) in enumerate(labels):
        lines.append(",".join([str(row), *["3"] * 16, *["0.5"] * 63, click, conv]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_aliexpress_purchase_without_click(tmp_path: Path) -> None:
    path = ali_csv(tmp_path / "train.csv", [("1", "1"), ("0", "0"), ("0", "1"), ("1", "0")])
    with pytest.raises(ShopDataError, match=r"train.csv, row 4, column 'conversion': conversion=1 but click=0"):
        load_aliexpress(path, name="x")
    shop = load_aliexpress(path, name="x", repair=True)
    assert shop.interactions["purchased"].tolist() == [1, 0, 0, 0] and shop.meta["repaired_rows"] == 1
    check_canonical(shop)


def test_alibaba_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ShopDataError, match=r"bad.csv, row 3, column 'click': value 2 is not a number in \[0, 1\]"):
        load_aliexpress(ali_csv(tmp_path / "bad.csv", [("1", "0"), ("2", "0")]), name="x")
    with pytest.raises(ShopDataError, match=r"nolabel.csv, column 'conversion': missing columns \['conversion'\]"):
        load_aliexpress(ali_csv(tmp_path / "nolabel.csv", [("1", "0")], header="click,conv"), name="x")
    folder = tmp_path / "split"
    folder.mkdir()
    ali_csv(folder / "a_train.csv", [("1", "0")])
    (folder / "b_test.csv").write_text("click,purchase,101\n1,0,7\n")
    with pytest.raises(ShopDataError, match="b_test.csv: columns differ"):
        load_aliexpress(folder, name="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShopDataError, match="no .csv files"):
        load_ali_ccp(tmp_path / "empty", name="x")
    ccp = tmp_path / "ccp.csv"
    ccp.write_text("click,purchase,101,206,D206\n1,0,u1,5,0.5\n1,0,u2,6,x\n")
    with pytest.raises(ShopDataError, match=r"ccp.csv, row 3, column 'D206'"):
        load_ali_ccp(ccp, name="x")


def test_ali_ccp_without_item_column(tmp_path: Path) -> None:
    ccp = tmp_path / "ccp.csv"
    ccp.write_text("click,purchase,101,206,D206\n1,1,u1,5,0.5\n0,0,u2,6,0.25\n1,0,u1,6,1\n")
    shop = load_ali_ccp(ccp, name="x")
    check_canonical(shop)
    assert (shop.interactions["item_id"] == "na").all() and shop.interactions["user_id"].tolist() == ["u1", "u2", "u1"]
    assert shop.available_tasks() == ["ctr", "cvr"]
    assert shop.interactions["ctx_206"].tolist() == ["5", "6", "6"]
    assert shop.interactions["ctx_D206"].dtype == np.float32
