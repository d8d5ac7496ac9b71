export {
  loadTokenizer,
  StreamDecoder,
  TextTokenizer,
  type DecodeOptions,
  type EncodeOptions,
  type SpecialToken,
  type TokenizerSourceOptions,
} from './tokenizer.js';
export {
  ChatTemplate,
  chatSpecialTokens,
  loadChatTemplate,
  missingChatTemplateError,
  strftime,
  type ChatMessage,
  type ChatSpecialTokens,
  type ChatTemplateOptions,
} from './chat.js';
export {
  loadGenerationConfig,
  parseGenerationConfig,
  stopTokenIds,
  type GenerationConfig,
} from './generation-config.js';
