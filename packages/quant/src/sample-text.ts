/**
 * The text `moeflash quant-report` scores when given none: some prose and some Python, the two
 * kinds of text the bundled demo tokenizer and most chat models see.
 *
 * @module
 */

/** Built-in sample for the quality report (about 400 tokens with a 50k-word BPE vocabulary). */
export const SAMPLE_TEXT = `Quantization stores each weight of a network in fewer bits than it was trained in. A block
of thirty-two neighbouring weights shares one power-of-two scale, and every weight keeps only a
sign, two exponent bits and one mantissa bit. The error this adds is small for most weights, but
a few large ones set the scale of their block, and the small weights beside them lose most of
their precision. Whether a model notices depends on where the error lands: the router that picks
experts is sensitive, the experts themselves much less so.

To find out, run the original and the quantized model on the same text and compare their
predictions token by token. If the quantized model puts its probability where the original does,
the divergence between the two distributions stays near zero and both assign the text almost the
same perplexity.

def moving_average(values, window):
    """Return the averages of every run of \`window\` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages


def count_words(text):
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?\\"'()")
        if word:
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


for name, count in count_words("the cat and the dog and the bird")[:3]:
    print(f"{name}: {count}")
`;
