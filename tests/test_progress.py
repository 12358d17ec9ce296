import logging

from vision_ft.progress import ProgressBar


def test_bar_counts_images_from_where_it_started(capsys, monkeypatch):
    clock = iter([100.0, 110.0, 120.0, 130.0])
    monkeypatch.setattr("vision_ft.progress.time.time", lambda: next(clock))
    with ProgressBar("fit", 20, enabled=True, images_per_unit=8, fields=("loss",)) as bar:
        bar.start_at(5)  # a resumed run: its first 5 steps are not this process's work
        bar.update(7, loss="0.1234")  # 2 steps x 8 images in 10 s
        assert bar.bar.tasks[0].fields == {"rate": "2", "loss": "0.1234"}
        bar.advance(3)  # 5 steps x 8 images in 20 s
        assert bar.completed == 10 and bar.bar.tasks[0].fields["rate"] == "2"
        assert bar.bar.tasks[0].completed == 10
    err = capsys.readouterr().err
    assert "fit" in err and "10/20" in err and "loss 0.1234" in err


def test_disabled_bar_draws_nothing_and_logs_notes(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="vision_ft.embed"):
        with ProgressBar("embed", 4, enabled=False) as bar:
            bar.advance(2)
            bar.note("halfway")
    assert bar.completed == 2
    assert capsys.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records] == ["halfway"]
