"""Runs inside vLLM's own environment (``vllm_check.py`` starts it): serve one AutoAWQ
directory with vLLM's offline ``LLM`` API on the CPU, answer one JSON request.

Request (a file): {"model": DIR, "sequences": [[ids]], "prompts": [[ids]], "max_tokens": N,
"dtype": "bfloat16", "batches": [1, 8, 32], "speed_tokens": 128, "answer": PATH}.
Answer (written to PATH): {"teacher": [[log-probability of each sequence token after its
prefix]], "greedy": [{"tokens": [...], "logprobs": [...]}], "speed": [{"batch": B,
"tokens_per_s": x, "seconds": s}], "vllm": version}. Needs no awqtensor: only vLLM reads
the export.
"""

import json
import sys
import time


def main(request_path: str) -> None:
    request = json.load(open(request_path))
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # On the CPU backend gpu_memory_utilization is the share of the NUMA node's RAM vLLM reserves.
    llm = LLM(model=request["model"], dtype=request.get("dtype", "bfloat16"), max_model_len=1024,
              skip_tokenizer_init=True, seed=0, gpu_memory_utilization=request.get("memory_fraction", 0.3))
    greedy = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=0, ignore_eos=True,
                            detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    scored = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    teacher = []  # log-probability of each given token after its prefix (teacher-forced)
    for out in llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request.get("sequences", [])], scored,
                            use_tqdm=False):
        teacher.append([step[token].logprob for token, step in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])])
    answers = []
    for out in llm.generate(prompts, greedy, use_tqdm=False):
        completion = out.outputs[0]
        logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]
        answers.append({"tokens": list(completion.token_ids), "logprobs": logprobs})
    speed = []
    for batch in request.get("batches", []):
        timed = SamplingParams(temperature=0.0, max_tokens=request.get("speed_tokens", 128), ignore_eos=True,
                               detokenize=False)
        batch_prompts = [TokensPrompt(prompt_token_ids=request["prompts"][i % len(prompts)]) for i in range(batch)]
        llm.generate(batch_prompts[:1], SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)  # warm
        start = time.perf_counter()
        outs = llm.generate(batch_prompts, timed, use_tqdm=False)
        seconds = time.perf_counter() - start
        speed.append({"batch": batch, "tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
                      "seconds": seconds})
    with open(request["answer"], "w") as f:  # vLLM logs to stdout, even after we finish
        json.dump({"teacher": teacher, "greedy": answers, "speed": speed, "vllm": vllm.__version__}, f)


if __name__ == "__main__":  # vLLM's engine starts processes: nothing may run at import
    main(sys.argv[1])
