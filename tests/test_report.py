import csv
import json

from nerve import report


def test_a_trained_run_has_its_cases_report_and_model_card(trained):
    results = trained[0]
    evaluation = json.loads((results / "evaluation.json").read_text())
    with open(results / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == evaluation["metrics"]["nerve"]["all folds"]["images"]  # every held-out frame, no views
    assert {"id", "group", "presence", "shown", "dice", "hd95_px", "nsd_10px", "true_area_px"} <= set(rows[0])
    figures = evaluation["summary"]["nerve"]["figures"]
    assert set(figures) >= {"dice_nonempty", "hd95_px", "sensitivity", "specificity", "ppv", "npv"}
    assert evaluation["data"]["train"] == 48 and evaluation["data"]["groups"] == 3
    page = (results / "report.html").read_text()
    assert "Headline figures" in page and "Worst cases" in page and "data:image/png;base64," in page
    card = (results / "MODEL_CARD.md").read_text()
    fields = report.model_card(results)
    assert fields["training_data"]["images"] == 48 and "nerve" in fields["task"]
    on = evaluation["tuned_on"]["nerve"]
    assert f"{on['rows']} held-out frames and crop views" in fields["gate"]["nerve"]
    assert fields["gate"]["nerve"] in card and "dice_nonempty" in card and fields["versions"]["keras"] in card


def test_the_labels_own_agreement_is_read_from_duplicates_csv(tmp_path):
    assert report.label_agreement(tmp_path) is None
    (tmp_path / "duplicates.csv").write_text(
        "id_a,id_b,distance,area_a,area_b,dice,one_empty,conflict\n"
        "1_1,1_2,0.01,100,90,0.800,0,0\n1_3,1_4,0.01,0,50,0.000,1,1\n2_1,2_2,0.02,40,40,0.600,0,1\n"
    )
    assert report.label_agreement(tmp_path) == {"dice": 0.7, "pairs": 2}  # the pair with one empty mask aside
