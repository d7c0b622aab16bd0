cd /work/main
export PATH=/work/main/.venv/bin:$PATH
here=results/inspect-embedded
question=$(python -c "import json; print(json.load(open('$here/question.json'))['question'])")
prefix=$(python -c "import json; print(json.load(open('$here/question.json'))['answer_prefix'])")
draftkv inspect --context-file "$here/context.txt" -q "$question" --answer-prefix "$prefix" \
  --methods dense,streamingllm@256,h2o@256,snapkv@256,pyramidkv@256,ada-snapkv@256,speckv@256,ada-speckv@256,laq@256,kvzip@256,keydiff@256,specpc@512,specprefill@512,lingua@512,keep-last@512,keep-ends@512,speckv-pc@256/512 \
  --max-new-tokens 48 --out "$here/every-method.html"
