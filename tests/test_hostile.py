"Hostile data (issue #21 B): every record is indexed or quarantined with a reason, and nothing it carries is run by what people open"
import io, json, time, tracemalloc
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from aliprod.config import ExperimentParams
from aliprod.rundirs import report_dir
from aliprod.data import DataParams, dataset_info, load_index, prepare_data, read_aliproducts

HTML = '<img src=x onerror=alert(1)>'
FORMULA = '=HYPERLINK("http:x","y")'

def _exp(tmp_path, name='t'):
    return ExperimentParams(experiment=name, runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))

def _jpeg(path, color=(200, 30, 30)):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (16, 12), color).save(path, quality=90)

def _aliproducts(tmp_path, records, good=('00000', '00001'))->tuple:
    "A data root with two good images per class in `good` plus `records` in train.json; (experiment, parameters)"
    root = tmp_path/'data'
    recs = [{'class_id': c, 'image_id': f'{i}.jpg'} for c in good for i in range(2)] + list(records)
    for r in recs[:2 * len(good)]: _jpeg(root/'train'/r['class_id']/r['image_id'])
    (root/'train.json').write_text(json.dumps({'images': recs}))
    return _exp(tmp_path), DataParams(source='aliproducts', root=str(root), train_file='train.json', scan_workers=1)

def test_nul_and_lone_surrogate_ids_are_quarantined_and_check_says_so(tmp_path):
    exp, p = _aliproducts(tmp_path, [{'class_id': '00000', 'image_id': 'a\x00b.jpg'}, {'class_id': '0\ud800', 'image_id': 'c.jpg'},
                                     {'class_id': '00001', 'image_id': 'x\udcff.jpg'}])
    arts = prepare_data(exp, p)
    q = pd.read_parquet(arts.quarantine)
    assert len(load_index(exp)) == 4 and q.reason.tolist() == ['bad_path'] * 3
    assert q.path.tolist() == ['a\\x00b.jpg', 'c.jpg', 'x\\udcff.jpg'] and 'holds a NUL byte (train.json:4)' in q.detail[0]
    assert 'class_id holds a lone surrogate' in q.detail[1] and q.class_name[1] == '0\\ud800'
    assert '\\udcff' in (report_dir(exp)/'quarantine.csv').read_text()
    from aliprod.pipeline import check_data_files
    assert '(3 to quarantine before the image scan)' in check_data_files(p)   # `aliprod check` no longer says all is well

def test_a_nul_in_a_csv_path_is_quarantined_not_a_crash(tmp_path):
    _jpeg(tmp_path/'data'/'a'/'1.jpg')
    (tmp_path/'data'/'train.csv').write_text('path,label\na/1.jpg,0\na/2\x00.jpg,0\n')
    arts = prepare_data(_exp(tmp_path), DataParams(source='csv', root=str(tmp_path/'data'), train_file='train.csv', scan_workers=1))
    q = pd.read_parquet(arts.quarantine)
    assert q.reason.tolist() == ['bad_path'] and q.path[0] == 'a/2\\x00.jpg' and 'path holds a NUL byte (train.csv:3)' == q.detail[0]

def test_a_megabyte_path_is_refused_before_any_file_call(tmp_path):
    exp, p = _aliproducts(tmp_path, [{'class_id': '00000', 'image_id': 'x' * 1_000_000}, {'class_id': 'c' * 300, 'image_id': 'y.jpg'},
                                     {'class_id': '00001', 'image_id': 'a/' * 300_000 + 'z.jpg'}])
    t = time.perf_counter()
    arts = prepare_data(exp, p)
    assert time.perf_counter() - t < 20   # os.path.realpath is quadratic in the parts: tens of seconds for the last one
    q = pd.read_parquet(arts.quarantine)
    assert q.reason.tolist() == ['bad_path'] * 3 and len(load_index(exp)) == 4 and 'image_id is 600,005 bytes long' in q.detail[2]
    assert 'image_id is 1,000,000 bytes long' in q.detail[0] and 'PC_PATH_MAX' in q.detail[0] and len(q.path[0]) < 5000
    assert 'class_id has a 300-byte name; a file name stops at' in q.detail[1] and 'PC_NAME_MAX' in q.detail[1]

def test_postscript_named_jpg_is_not_handed_to_ghostscript(tmp_path):
    exp, p = _aliproducts(tmp_path, [{'class_id': '00000', 'image_id': 'ps.jpg'}])
    (Path(p.root)/'train'/'00000'/'ps.jpg').write_bytes(b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n')
    q = pd.read_parquet(prepare_data(exp, p).quarantine)
    assert q.reason.tolist() == ['undecodable'] and 'cannot identify image file' in q.detail[0] and 'JPEG, PNG' in q.detail[0], q.detail[0]

def test_a_math_text_class_name_does_not_kill_the_gallery():
    from aliprod.clean import plot_gallery
    rows = pd.DataFrame({'path': ['a.jpg'], 'label': [0], 'top1': [1], 'conf': [0.9], 'p_label': [0.1], 'action': ['relabel'], 'new_label': [1]})
    fig = plot_gallery(rows, None, class_names=['$\\frac^$', '$x$ & $'])
    fig.savefig(io.BytesIO(), format='png')   # mathtext would raise here: ParseException on '$\frac^$'
    assert '$\\frac^$' in fig.axes[0].get_title()

def test_a_large_16bit_grey_png_is_limited_by_bytes_and_converted_without_float64_copies(tmp_path):
    from aliprod.images import check_image, load_rgb
    Image.fromarray(np.full((1500, 2000), 65535, np.uint16)).save(tmp_path/'g16.png')   # 3M pixels, 6 MB decoded
    reason, detail, *_ = check_image(tmp_path/'g16.png', tmp_path, max_pixels=3_000_000, max_bytes=5_000_000)
    assert reason == 'too_large' and 'decodes to 6,000,000 bytes > max_bytes=5,000,000' in detail
    assert check_image(tmp_path/'g16.png', tmp_path, max_pixels=3_000_000)[:2] == (None, '')   # default: 4 bytes a pixel
    tracemalloc.start()
    x = load_rgb(tmp_path/'g16.png', max_pixels=3_000_000)
    peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    assert x.getpixel((5, 5)) == (255, 255, 255)
    assert peak < 6 * 3_000_000, f'{peak:,} bytes for 3M pixels'   # float64 temporaries took about 24 bytes a pixel

def test_train_json_is_streamed_not_read_whole(tmp_path):
    n = 100_000
    recs = [{'class_id': f'{i % 500:05d}', 'image_id': f'{i:08x}e3b0c44298fc1c149afb.jpg', 'extra': [i, 'x' * 20]} for i in range(n)]
    (tmp_path/'train.json').write_text(json.dumps({'info': 'v1', 'images': recs}))
    del recs
    size = (tmp_path/'train.json').stat().st_size
    tracemalloc.start()
    r = read_aliproducts(tmp_path, {'train': 'train.json'})
    peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    assert len(r.index) == n and r.index.path[n - 1] == f'train/{(n - 1) % 500:05d}/{n - 1:08x}e3b0c44298fc1c149afb.jpg'
    assert peak < 2.5 * size, f'peak {peak / 2**20:.0f} MB for a {size / 2**20:.0f} MB file'   # json.loads held the text and every dict

def test_a_backslash_in_a_class_id_is_part_of_its_folder_name(tmp_path):
    exp, p = _aliproducts(tmp_path, [{'class_id': 'a\\b', 'image_id': '1.jpg'}])
    _jpeg(Path(p.root)/'train'/'a\\b'/'1.jpg')
    prepare_data(exp, p)
    idx = load_index(exp)
    assert 'train/a\\b/1.jpg' in set(idx.path) and 'a\\b' in set(idx.class_name) and not len(pd.read_parquet(tmp_path/'runs'/'t'/'data'/'quarantine.parquet'))

def test_a_truncated_dataset_json_is_a_clear_error_and_stale_for_the_data_stage(tmp_path):
    exp, p = _aliproducts(tmp_path, [])
    arts = prepare_data(exp, p)
    text = arts.dataset_json.read_text()
    arts.dataset_json.write_text(text[:len(text) // 2])
    with pytest.raises(FileNotFoundError, match=r'dataset.json is cut short or corrupt .*re-run the data stage'): dataset_info(exp)
    prepare_data(exp, p)                                                       # its own output cut short: rebuilt, not a crash
    assert json.loads(arts.dataset_json.read_text()) == json.loads(text)

def test_tables_escape_formulas_and_html(tmp_path):
    "quarantine.csv / phantom_classes.csv: formulas prefixed with ', numbers stay numbers; quarantine.md: HTML, pipes and CRs escaped"
    exp, p = _aliproducts(tmp_path, [{'class_id': FORMULA, 'image_id': '-1.jpg'}, {'class_id': HTML, 'image_id': 'e\\|f.jpg'},
                                     {'class_id': '@SUM(1)', 'image_id': 'a\rb.jpg'}])
    prepare_data(exp, p)
    rep = report_dir(exp)
    q = pd.read_csv(rep/'quarantine.csv')
    assert len(q) == 3 and set(q.class_name) == {"'" + FORMULA, HTML, "'@SUM(1)"}
    assert q.reason_count.dtype.kind == 'i' and not any(str(v).startswith(('=', '+', '-', '@')) for v in q.to_numpy().ravel())
    ph = pd.read_csv(rep/'phantom_classes.csv')
    assert "'" + FORMULA in set(ph.class_name) and ph.n_quarantined.dtype.kind == 'i'
    md = (rep/'quarantine.md').read_text()
    assert '<img' not in md and '&lt;img src=x onerror=alert(1)&gt;' in md and '\r' not in md
    assert 'e\\\\\\|f.jpg' in md   # the backslash doubled, then the pipe escaped: one cell

def test_a_hostile_class_name_is_escaped_in_index_html(tmp_path):
    from test_ensemble import fake_run
    from aliprod.rundirs import experiment_dir
    from aliprod.report import ReportParams, run_report
    exp = fake_run(tmp_path, splits=('train', 'test'))
    block = {'top1_err': 0.5, 'top5_err': 0.2, 'mean_class_err': 0.5, 'many_acc': 0.9, 'medium_acc': 0.7, 'few_acc': 0.1, 'n': 30}
    (experiment_dir(exp)/'train/0/metrics.json').write_text(json.dumps({'test': dict(block, target='label')}))
    # the report shows only what a current run stands behind: the data stage's manifest
    from aliprod.rundirs import StageRun
    StageRun(experiment_dir(exp)/'data', 'data', {}, threads=False).finish(['index.parquet', 'dataset.json'])
    report_dir(exp).mkdir(parents=True, exist_ok=True)   # a table the data stage left, quoting a class name
    pd.DataFrame({'metric': ['classes', f'largest class: {HTML}'], 'value': ['6', FORMULA]}).to_csv(report_dir(exp)/'data_summary.csv', index=False)
    art = run_report(exp, ReportParams(split='test'))
    page = art.index_html.read_text()
    assert '&lt;img src=x onerror=alert(1)&gt;' in page and HTML not in page
    assert HTML not in (report_dir(exp)/'README.md').read_text() and HTML not in (report_dir(exp)/'data_summary.md').read_text()
    assert pd.read_csv(report_dir(exp)/'data_summary.csv').value.tolist() == ['6', "'" + FORMULA]
