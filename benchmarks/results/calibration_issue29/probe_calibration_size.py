import json, numpy as np, pyarrow.parquet as pq, sys
sys.path.insert(0,'/work/main'); import peft_qlora as p
from dataclasses import replace
m=json.load(open('outputs/imdb_qlora/model/metrics.json'))
c=p.Classifier.load('outputs/imdb_qlora/model')
tr=pq.read_table('/work/shared/data/imdb/train.parquet').to_pydict()
te=pq.read_table('/work/shared/data/imdb/test.parquet').to_pydict()
taken=set(p.balanced_subset(tr['label'],512,42))
spare=[i for i in range(len(tr['label'])) if i not in taken]
rng=np.random.default_rng(1); cal=rng.choice(spare,1000,replace=False)
ev=set(p.balanced_subset(te['label'],256,42)); rows=[i for i in range(len(te['label'])) if i not in ev]
test=np.random.default_rng(0).choice(rows,1500,replace=False)
lc=c.logits([tr['text'][i] for i in cal]).numpy(); yc=np.array([tr['label'][i] for i in cal])
lt=c.logits([te['text'][i] for i in test]).numpy(); yt=np.array([te['label'][i] for i in test])
np.savez('/tmp/qs/logits.npz', lc=lc, yc=yc, lt=lt, yt=yt)
task=replace(c.task, temperature=None)
for name,(l,y) in {'cal1000':(lc,yc),'cal256':(lc[:256],yc[:256]),'test':(lt,yt)}.items():
    T=task.fit_temperature(l,y)
    f=replace(task,temperature=T).calibration(lt,yt)['calibration']
    print(name, T, 'test ece', f['uncalibrated']['ece'], '->', f['calibrated']['ece'])
