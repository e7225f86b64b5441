"The report stage (aliprod.report) on a synthetic run directory without a test split: the page, its links, its captions"
import json, re
from html.parser import HTMLParser
import nbformat, pandas as pd, pytest
from aliprod.config import ParamsError
from aliprod.rundirs import StageRun, experiment_dir, report_dir
from aliprod.ensemble import EnsembleParams, run_ensemble
from aliprod.report import ReportParams, run_report
from test_ensemble import fake_run   # the data stage's files and two members' train/val predictions

def finish(d, stage='fake'):
    "The manifest a stage writes last, every file of its run directory an output: the report reads only runs whose manifest is current"
    StageRun(d, stage, {}, threads=False).finish([f for f in d.rglob('*') if f.is_file() and f.name != 'manifest.json'])

def put_metrics(exp, rel, mce, few):
    "A metrics file as the train and TTA stages write it: val only, given and clean labels; then the run's manifest"
    block = {'top1_err': mce + 0.01, 'top5_err': mce / 2, 'mean_class_err': mce, 'many_acc': 0.9, 'medium_acc': 0.7, 'few_acc': few, 'n': 30}
    f = experiment_dir(exp)/rel/'metrics.json'
    f.write_text(json.dumps({'val': dict(block, target='label'), 'val_clean': dict(block, target='clean_label')}))
    finish(f.parent)

class Page(HTMLParser):
    "Every src/href of a page, and whether it holds code"
    def __init__(self):
        super().__init__(); self.refs, self.code = [], []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [a[k] for k in ('src', 'href') if a.get(k)]
        if tag in ('pre', 'code', 'textarea') or any(c in (a.get('class') or '') for c in ('jp-InputArea', 'input_area', 'highlight', 'jp-CodeCell')):
            self.code.append(tag)

def parse(path):
    p = Page(); p.feed(path.read_text()); return p

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A run without a test split: data stage, a model and its TTA with val metrics, an ensemble of both, an executed stage notebook"
    exp = fake_run(tmp_path_factory.mktemp('report'))
    put_metrics(exp, 'train/0', 0.40, 0.20); put_metrics(exp, 'tta/0/ten-x1.5', 0.35, 0.30)
    (experiment_dir(exp)/'tta/0/center-x1').mkdir(parents=True); put_metrics(exp, 'tta/0/center-x1', 0.40, 0.20)
    run_ensemble(exp, EnsembleParams(name='pair', k=4, members=['train', 'tta:ten-x1.5'], splits=['val']), 0)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print('stage output')", outputs=[nbformat.v4.new_output('stream', text='stage output\n')])]
    (report_dir(exp)/'notebooks').mkdir()
    nbformat.write(nb, report_dir(exp)/'notebooks'/'06_ensemble.ipynb')
    from aliprod.pipeline import render_html
    render_html(report_dir(exp)/'notebooks'/'06_ensemble.ipynb')
    return exp

@pytest.fixture(scope='module')
def given(run):
    "The report of `run` on val, given labels"
    return run_report(run, ReportParams(split='val', target='given'))

def test_every_link_of_the_page_exists_and_no_page_holds_code(given):
    art = given
    page = parse(art.index_html)
    assert not page.code, f'index.html holds code: {page.code}'
    local = [r for r in page.refs if '://' not in r and not r.startswith('#')]
    assert {'shot_groups_alone.png', 'ensemble_pair.png', 'techniques_alone.csv', 'ensemble_pair.csv', 'notebooks/06_ensemble.html'} <= set(local)
    assert [r for r in local if not (art.index_html.parent/r).is_file()] == []
    for r in local:
        if r.endswith('.csv'): pd.read_csv(art.index_html.parent/r)   # every linked table parses
    text = (art.index_html.parent/'notebooks'/'06_ensemble.html').read_text()
    assert "print(&#39;stage output&#39;)" not in text and "print('stage output')" not in text and 'stage output' in text  # outputs, not code
    assert not [c for c in re.findall(r'class="([^"]*)"', text) if 'jp-InputArea' in c or 'jp-InputPrompt' in c]   # no input cell is rendered
    md = art.readme.read_text()
    for r in local:
        if r.endswith('.png'): assert f']({r})' in md   # README.md shows the same figures

def test_the_page_opens_with_a_summary_and_names_the_split_everywhere(given):
    art = given
    html = art.index_html.read_text()
    assert art.summary.startswith('No final system: the system stage has not run')   # the report opens with the final system, or says there is none
    # then the splits, labels, seed and data, a compact line each, before any table
    assert html.index('No final system') < html.index('<b>splits</b>: ') < html.index('<b>labels</b>: the val split, the given labels') \
        < html.index('<b>seed</b>: 0; one training seed') < html.index('<b>data</b>: aliproducts: 60 images (30 train / 30 val / 0 test)') \
        < html.index('<table')
    assert art.readme.read_text().split('\n')[2] == art.summary   # README.md opens with it too
    assert art.header['numbers from'].startswith('the val split, the given labels')
    for name, table in art.tables.items():   # a split column, or a caption naming the split
        assert ('split' in table.columns and set(table['split']) == {'val'}) or 'split' in art.notes[name], name
    assert 'chain' not in art.tables and set(art.tables['techniques_alone']['labels']) == {'given'}
    # no test split: the rows are evaluated again on val's reporting half, from predictions; TTA's baseline (center-x1) has none
    assert list(art.tables['techniques_alone']['technique']) == ['ensemble pair']
    assert (art.tables['techniques_alone']['metrics file'].str.startswith('report/reporting_metrics.json')).all()
    # the note counts the comparisons Holm's correction runs over; then one line per row, headed by what it is compared with
    assert '1 comparison with a paired interval' in html and all(f.against.endswith('val split, given labels') for f in art.findings)
    # the ensemble and train:0 both have val predictions: its Δ has a paired interval and the verdict follows it; TTA's has no predictions
    ens = art.tables['techniques_alone'].set_index('technique').loc['ensemble pair']
    assert ens['Δ lo'] <= ens['Δ mean class err'] <= ens['Δ hi']
    assert ens['verdict'] == ('helped' if ens['Δ hi'] < 0 else 'hurt' if ens['Δ lo'] > 0 else 'no measurable effect')
    assert 'reporting images of the val split' in art.findings[0].against and 'one standard error' not in ' '.join(map(str, art.findings))
    for title, f, caption in art.figure_files:
        assert 'split' in caption, title
    assert '(val split, given labels)' in html or 'val split, given labels' in html

def test_shot_groups_come_from_the_data_stage(run, given):
    art = given
    from aliprod.report import per_class_frame
    f = per_class_frame(run, 'train/0/predictions/val.parquet', 'given')
    assert list(f['group']) == ['many' if c > 6 else 'few' if c < 4 else 'medium' for c in f['n_train']]   # dataset.json: 6 and 4
    assert 'more than 6 training images' in art.header['shot groups']

def test_a_split_the_run_lacks_is_refused_naming_the_one_it_has(run):
    with pytest.raises(ParamsError, match=r"no metrics file .* has 'test' numbers \(they have val\); set report: \{split: val\}"):
        run_report(run, ReportParams(split='test'))

def test_a_run_without_val_split(tmp_path):
    exp = fake_run(tmp_path, splits=('train', 'test'))
    block = {'top1_err': 0.5, 'top5_err': 0.2, 'mean_class_err': 0.5, 'many_acc': 0.9, 'medium_acc': 0.7, 'few_acc': 0.1, 'n': 30}
    (experiment_dir(exp)/'train/0/metrics.json').write_text(json.dumps({'test': dict(block, target='label')}))
    finish(experiment_dir(exp)/'train/0')
    art = run_report(exp, ReportParams(split='test'))
    assert art.header['numbers from'].startswith('the test split') and not len(art.tables['techniques_alone'])
    with pytest.raises(ParamsError, match=r"set report: \{split: test\}"): run_report(exp, ReportParams(split='val'))


def put_system(exp, report_split='val'):
    "The files of a system stage, written by hand: system.json, chain.csv and the final system's predictions of the reporting images"
    from aliprod.predictions import read_topk, write_topk
    d = experiment_dir(exp)/'system'; (d/'predictions').mkdir(parents=True, exist_ok=True)
    t = read_topk(experiment_dir(exp)/'train/0/predictions/val.parquet')
    write_topk(d/'predictions'/'report.parquet', t.take(slice(15, None)))
    vs = {'delta': -0.05, 'lo': -0.09, 'hi': -0.01, 'verdict': 'helped', 'baseline': 'iteration 0'}
    (d/'system.json').write_text(json.dumps({
        'sets': {'how': 'no test split: the choosing half of val chose, the other half reports', 'report_split': report_split, 'choose_split': 'val'},
        'numbers': {'mean_class_err': 0.3, 'lo': 0.2, 'hi': 0.4, 'interval': 'class-stratified bootstrap of the metric itself', 'target': 'given',
                    'report_images': 15, 'vs_baseline': vs},
        'choices': {'round': 1, 'rounds': [0, 1], 'method': 'crt', 'tau': 0.5, 'tta': {'views': 'ten', 'enlarge': 1.5}, 'members': ['TTA ten@1.5', 'train-b:1']}}))
    pd.DataFrame([{'step': 'Baseline', 'status': 'present', 'system': 'iteration 0', 'what': 'all data', 'mean_class_err': 0.35, 'many_acc': 0.5, 'medium_acc': 0.5, 'few_acc': 0.5,
                   'n': 15},
                  {'step': '+ High-resolution finetune', 'status': 'absent', 'system': '', 'what': 'part of the trained model; measured alone'},
                  {'step': '+ Ensemble', 'status': 'present', 'system': 'e', 'what': 'greedy', 'mean_class_err': 0.3, 'many_acc': 0.6, 'medium_acc': 0.5, 'few_acc': 0.6,
                   'n': 15, 'Δ mean class err': -0.05, 'Δ lo': -0.09, 'Δ hi': -0.01, 'verdict': 'helped'}]).to_csv(d/'chain.csv', index=False)
    finish(d, 'system')

def test_the_report_opens_with_the_final_system_and_its_chain(run, tmp_path):
    import shutil
    exp = fake_run(tmp_path)
    put_system(exp)
    art = run_report(exp, ReportParams(split='val', target='given'))
    # two short lines: the system's number with its interval; on which images, and its Δ on the baseline
    assert art.summary == ('Final system: mean class error 0.300 (95% interval 0.200 to 0.400) on 15 reporting images of the val split, '
                           'given labels; against the baseline (iteration 0): Δ -5.0 points (paired 95% interval -9.0 to -1.0): helped.')
    assert list(art.tables)[:2] == ['chain', 'techniques_alone'] and art.missing == ['+ High-resolution finetune']
    assert 'against single techniques' not in art.header   # no technique-alone row to compare
    page = art.index_html.read_text()
    # the first screen: the number, the table of its choices, the chain, the tail-accuracy figure; then the compact lines
    assert page.index("id='final-system' class='headline'>Final system: mean class error 0.300 (95% interval 0.200 to 0.400)</p>") \
        < page.index("<div id='choices'") < page.index("<section id='chain'>") < page.index("id='tail-accuracy'") \
        < page.index("<ul class='facts'>") < page.index(">Techniques alone</h2>")
    choices = page[page.index("<div id='choices'"):page.index("<section id='chain'>")]
    for cell in ('1 (of 0, 1)', 'crt', '0.5', 'ten@1.5', '2: TTA ten@1.5, train-b:1'): assert f'<td>{cell}</td>' in choices, cell
    # each table once: the chain on the first screen (every column in chain.csv), no second chain table further down
    assert page.count('<td>+ Ensemble</td>') == 1 and "id='chain-table'" not in page and page.count("src='tail_accuracy.png'") == 1
    assert "<td>+ High-resolution finetune</td><td colspan='3'>absent: part of the trained model</td>" in page
    assert '<td>-5.0 [-9.0, -1.0]</td>' in page
    md = art.readme.read_text()
    assert md.count('| + Ensemble |') == 1 and md.index('| cleaning round |') < md.index('| step |') < md.index('![Per-class tail accuracy]')
    assert '| 15 |' in (art.index_html.parent/'chain.md').read_text() and '15.000' not in (art.index_html.parent/'chain.md').read_text()
    f = [f for f in art.findings if f.group == 'chain']
    assert len(f) == 1 and f[0].line == '+ Ensemble (e): 0.300, Δ -5.0 [-9.0, -1.0] points: helped'
    assert {'tail_accuracy', 'shot_groups'} <= set(art.figures)
    local = [r for r in parse(art.index_html).refs if '://' not in r and not r.startswith('#')]
    assert 'chain.csv' in local and [r for r in local if not (art.index_html.parent/r).is_file()] == []
